"""`streamlit run ui/app.py` from a checkout: the page itself ships inside the package (imgsearch/ui/app.py)."""

from imgsearch.ui.app import *  # noqa: F401,F403  (tests and old imports reach md, parse_params, ... here)
from imgsearch.ui.app import main

if __name__ == "__main__":
    main()
