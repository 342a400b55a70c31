from imgsearch.cli import app

app(prog_name="imgsearch")
