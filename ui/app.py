"""`streamlit run ui/app.py` from a checkout: the page itself ships inside the package (imgsearch/ui/app.py,
which `imgsearch ui` runs), so a wheel or a non-editable install has it too."""

from imgsearch.ui.app import main, md, parse_params

__all__ = ["main", "md", "parse_params"]  # old imports of the page's helpers keep working

if __name__ == "__main__":
    main()
