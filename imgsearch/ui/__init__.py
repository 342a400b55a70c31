"""The Streamlit page shipped with the package (run by `imgsearch ui`)."""
