"""imgsearch web page (Streamlit): search by words or an example image, refine with 👍/👎, browse the results
as thumbnails, on a map and on a timeline, keep searches as albums, index folders.

Start it with `imgsearch ui`. The search lives in the URL (?q=..., ?like=<ids>&unlike=<ids> (marks; one
like alone is "more like this"), ?view=<image id>, &not=, &k=, &min=, &under=, &after=, &before=, &near=,
&camera=; ?page=albums&album=NAME), so any page can be bookmarked or shared. The model and the index are
loaded once per server process and shared by every browser tab. Talks only to the library's public API;
every library error is shown as a message, never a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Mapping

import streamlit as st

from imgsearch import Library
from imgsearch.commands import when
from imgsearch.commands.ui import MAX_UPLOAD_MB  # the cap `imgsearch ui` gives Streamlit's server too
from imgsearch.config import HEIC_EXTENSIONS, IMAGE_EXTENSIONS, MAX_K, RAW_EXTENSIONS, Settings
from imgsearch.errors import ImgSearchError, LibraryError, ParamError, UsageError
from imgsearch.output import human_bytes, shortened
from imgsearch.request import MAX_TEXT, SearchRequest, Term
from imgsearch.results import IndexReport

log = logging.getLogger("imgsearch.ui")

COLUMNS = 5
PAGE = 100  # thumbnails a grid draws at once: with a few hundred, each redraw (each 👍) took many seconds
DEFAULT_K = 20
UPLOAD_TYPES = sorted(e[1:] for e in IMAGE_EXTENSIONS | HEIC_EXTENSIONS | RAW_EXTENSIONS)
WHEN_WHERE = ("after", "before", "near", "camera")  # URL keys, Params fields and Library.search arguments
# The page's URL names that differ from the search request's (request.SearchRequest.from_params).
URL_NAMES = {"min": "min_score"}
# The search form's text fields: URL key (its widget is "w_<key>") -> Params field.
TEXT_FIELDS = {"q": "q", "not": "neg", "under": "under", **{key: key for key in WHEN_WHERE}}


# --- the search as it appears in the URL ------------------------------------------------------------
@dataclass
class Params:
    q: str = ""
    neg: str = ""  # URL key "not"
    like: tuple[int, ...] = ()  # results marked 👍 (one alone, without text: "more like this")
    unlike: tuple[int, ...] = ()  # and 👎
    view: int | None = None  # detail view: an image id
    k: int = DEFAULT_K
    min_score: float | None = None  # URL key "min"
    under: str = ""
    after: str = ""  # when and where: passed to Library.search as typed; it names a bad one
    before: str = ""
    near: str = ""  # "LAT,LON[,KM]"
    camera: str = ""
    page: str = ""  # "albums", else the search
    album: str = ""  # the album open on the albums page
    problems: list[str] = field(default_factory=list)

    def to_url(self) -> dict[str, str]:
        """Query-string form; defaults are left out so shared links stay short."""
        out = {"q": self.q, "not": self.neg, "like": ",".join(map(str, self.like)),
               "unlike": ",".join(map(str, self.unlike)), "view": "" if self.view is None else str(self.view),
               "k": "" if self.k == DEFAULT_K else str(self.k),
               "min": "" if self.min_score is None else f"{self.min_score:g}", "under": self.under,
               **{key: getattr(self, key) for key in (*WHEN_WHERE, "page", "album")}}
        return {key: value for key, value in out.items() if value}

    @property
    def example(self) -> int | None:
        """The image of a "more like this" search: one 👍 and nothing else to search for."""
        return self.like[0] if len(self.like) == 1 and not (self.q or self.neg or self.unlike) else None

    def marked(self, image_id: int, good: bool) -> "Params":
        """This search with one result's 👍 (good) or 👎 toggled; marking one way unmarks the other."""
        mine, other = ("like", "unlike") if good else ("unlike", "like")
        marks = {key: [i for i in getattr(self, key) if i != image_id] for key in (mine, other)}
        if image_id not in getattr(self, mine):
            marks[mine].append(image_id)
        return replace(self, view=None, **{key: tuple(ids) for key, ids in marks.items()})


def parse_params(raw: Mapping[str, str]) -> Params:
    """Read the URL into the form's fields. The search itself is checked by request_of, with the same
    messages as every other door; here a value the form cannot show is left at its default."""
    p = Params()

    def text(key: str) -> str:
        return str(raw.get(key, "") or "").strip()

    for key, attr in {**TEXT_FIELDS, "page": "page", "album": "album"}.items():
        setattr(p, attr, text(key))
    for key in ("like", "unlike"):  # ids joined by commas; request_of names a bad one
        setattr(p, key, tuple(int(i) for i in text(key).split(",") if i.strip().isdigit()))
    if raw.get("view"):
        try:
            p.view = Library.parse_id(raw["view"])
        except UsageError as e:
            p.problems.append(f"view=: {e}; ignored")
    for key, attr, kind in (("k", "k", int), ("min", "min_score", float)):
        with suppress(ValueError):  # request_of names it
            setattr(p, attr, kind(text(key))) if text(key) else None
    return p


def request_of(raw: Mapping[str, str], upload: tuple[str, bytes] | None = None) -> SearchRequest:
    """The URL's search as a SearchRequest (and an uploaded image, kept in memory): a bad value is a
    ParamError naming it, as at every other door."""
    from imgsearch.request import PARAMS

    # A page address may carry other parameters (view=, a tracker's); only the search's own are read.
    params = {key: value for key, value in raw.items() if URL_NAMES.get(key, key) in PARAMS}
    params.setdefault("k", str(DEFAULT_K))
    for key in ("like", "unlike"):  # the page marks by id; a path would only echo the server's file names back
        if not all(part.strip().isdigit() for part in str(raw.get(key) or "0").split(",")):
            raise ParamError(key, f"give image ids, as in {key}=12,31")
    image = None
    if upload is not None:
        name, data = upload
        if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
            raise UsageError(f"the uploaded file {name} is {human_bytes(len(data))}; query images can be at most "
                             f"{MAX_UPLOAD_MB} MB")
        image = Term("image", data, 1.0, name, "the uploaded file")
    request = SearchRequest.from_params(params, URL_NAMES, image)
    # A "more like this" example is shown above the grid, not in it; every hit is judged against the
    # relevance floor.
    alone = len(request.like) == 1 and not (request.positives or request.negatives or request.unlike)
    example = request.like if alone and isinstance(request.like[0], int) else ()
    return request.with_(exclude_ids=request.ids + example, relevance=True)


# --- per-process state: warm library, index jobs --------------------------------------------------
@st.cache_resource(show_spinner=False, hash_funcs={Settings: repr})
def the_library(settings: Settings):
    """The one Library per library and model for the whole server process, shared by every session's thread
    and the index runs started here (imgsearch.Library documents what it locks); it loads what each use needs."""
    return Library(settings=settings)


@st.cache_resource(show_spinner="Loading the model and the index…", hash_funcs={Settings: repr})
def warm_library(settings: Settings):
    """That same Library with its model and index loaded, once."""
    return the_library(settings).load()


def library_version(settings: Settings) -> int | None:
    """Moves whenever any process (`imgsearch watch`, `index`, `forget`) changes images or vectors."""
    try:
        return the_library(settings).version()
    except LibraryError:
        return None  # no library yet


@st.cache_data(ttl=10, show_spinner=False, hash_funcs={Settings: repr})
def cached_status(settings: Settings, last_job: float | None, version: int | None = None) -> dict | None:
    """The library's status, or None when there is none yet (it walks the cache folders: keep it cheap).
    ``last_job`` (this process's last index run) and ``version`` (the library's change counter) are in the
    cache key, so a finished run, here or in another process, shows at once."""
    try:
        return the_library(settings).status().as_dict()
    except LibraryError:
        if not settings.db_path.exists():
            return None
        raise


@dataclass
class IndexJob:
    folder: str
    started: float = field(default_factory=time.time)
    done: int = 0
    total: int = 0
    stage: str = ""  # set while the FAISS index is rebuilt after the files
    finished: float | None = None
    report: IndexReport | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.finished is None


class IndexJobs:
    """At most one indexing run per library per server process, in a thread so the page stays usable."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current: IndexJob | None = None

    def start(self, settings: Settings, folder: str) -> IndexJob:
        with self.lock:
            if self.current is not None and self.current.running:
                raise UsageError(f"already indexing {self.current.folder}; wait for it to finish")
            job = self.current = IndexJob(folder)

        def progress(done: int, total: int, stage: str = "") -> None:
            job.stage, job.done, job.total = stage, done, total

        def work() -> None:
            try:
                lib = the_library(settings)
                job.report = lib.index([folder], progress=progress,
                                       build_progress=lambda stage, d, t: progress(d, t, stage))
            except ImgSearchError as e:
                job.error = str(e)
            except Exception as e:  # a bug: keep the server up, log the details, show one line
                log.exception("indexing %s failed", folder)
                job.error = f"internal error: {type(e).__name__}: {e} (details in the server log)"
            finally:
                job.finished = time.time()

        threading.Thread(target=work, name="imgsearch-index", daemon=True).start()
        return job


@st.cache_resource(show_spinner=False)
def index_jobs(home: str) -> IndexJobs:
    return IndexJobs()


# --- URL <-> widgets ----------------------------------------------------------------------------------
def sync_widgets(p: Params) -> None:
    """When the URL changed (link opened, button clicked), show its search in the form; another search (not
    just other marks or details) starts at the first page of results."""
    search = tuple(sorted(replace(p, like=(), unlike=(), view=None).to_url().items()))
    if st.session_state.get("_search") != search:
        st.session_state.update(_search=search, _shown=PAGE)
    key = tuple(sorted(p.to_url().items()))
    if st.session_state.get("_url") == key:
        return
    st.session_state.update({"_url": key, "w_k": p.k, "w_min": p.min_score,
                             "w_page": "Albums" if p.page == "albums" else "Search",
                             **{f"w_{name}": getattr(p, attr) for name, attr in TEXT_FIELDS.items()}})


def go(p: Params) -> None:
    st.query_params.from_dict(p.to_url())


def on_search() -> None:
    """Form submitted: the form's values become the URL (the 👍/👎 marks stay: they refine this search
    too); an uploaded image is kept in memory only."""
    ss = st.session_state
    upload = ss.get("w_upload")
    ss.upload = (upload.name, upload.getvalue()) if upload is not None else None
    cur = parse_params(st.query_params)
    go(Params(like=cur.like, unlike=cur.unlike, k=int(ss.w_k or DEFAULT_K), min_score=ss.w_min,
              **{attr: (ss.get(f"w_{key}") or "").strip() for key, attr in TEXT_FIELDS.items()}))


def on_more_like(image_id: int) -> None:
    st.session_state.upload = None
    cur = parse_params(st.query_params)
    go(Params(like=(image_id,), k=cur.k, min_score=cur.min_score, under=cur.under,
              **{key: getattr(cur, key) for key in WHEN_WHERE}))


def on_mark(image_id: int, good: bool) -> None:
    go(parse_params(st.query_params).marked(image_id, good))


def on_change(**fields) -> None:
    go(replace(parse_params(st.query_params), **fields))


# --- rendering ----------------------------------------------------------------------------------------
# Every ASCII punctuation character: CommonMark lets a backslash make each one literal, so no link,
# image, emphasis, $math$, :color[directive], HTML, entity (&amp;) or table survives, and escaping the
# ':' of '://', the '.' of 'www.' and the '@' of an address stops GFM from turning bare URLs into links.
_MD_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")
# Line breaks and other control characters would start new Markdown blocks (headings, lists, code);
# bidi overrides can make 'gpj.exe' read as 'exe.jpg'; lone surrogates (bytes of a file name that is not
# UTF-8) cannot be sent to the browser at all. Each is shown as its escape sequence instead.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": r"\n", "\r": r"\r", "\t": r"\t"}


def _visible(m: re.Match) -> str:
    c = m.group()
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
        return f"\\x{o - 0xDC00:02x}"
    return _NAMED.get(c) or (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")


def visible(text) -> str:
    """Text for the browser as plain text (a code block, a tooltip): on one line, every character seen."""
    return _INVISIBLE.sub(_visible, str(text))


def md(text) -> str:
    """Any user-, file- or library-derived text (query, path, file name, tag, error message) made safe to
    put in Markdown: it shows literally, on one line, and nothing in it can link, load or format."""
    return _MD_PUNCT.sub(r"\\\1", visible(text))


def caption(name: str, score: float | None = None) -> str:
    short = shortened(name, 32)
    return f"{score:.3f} · {short}" if score is not None else short


def grid(library, hits, key: str, p: Params | None = None) -> None:
    """Thumbnails with score and file name, a page at a time; each has 'Details' and 'More like this', and
    with ``p`` (a search to refine) 👍 and 👎, shown pressed when marked."""
    shown = st.session_state.get("_shown", PAGE)
    rest, hits = len(hits) - shown, hits[:shown]
    paths = library.thumbnails([h.id for h in hits], library.THUMB)
    for start in range(0, len(hits), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, hit in zip(cols, hits[start:start + COLUMNS]):
            with col:
                thumb, label = paths.get(hit.id), md(caption(os.path.basename(hit.path), hit.score))
                if isinstance(thumb, ImgSearchError) or thumb is None:
                    st.warning(f"{label}: {md(thumb)}")
                else:
                    st.image(str(thumb), caption=label, width="stretch")
                # one row: [👍 👎] Details, More like this
                *marks, b1, b2 = st.columns([0.8, 0.8, 2, 4.4] if p is not None else [2, 3], gap=None)
                for col_, good, label in zip(marks, (True, False), ("👍", "👎")):
                    on = hit.id in (p.like if good else p.unlike)
                    col_.button(label, key=f"{key}-{'up' if good else 'down'}-{hit.id}", on_click=on_mark,
                                args=(hit.id, good), type="primary" if on else "tertiary",
                                help="Unmark" if on else "What you want: refine toward it" if good
                                else "Not what you want: refine away from it")
                b1.button("Details", key=f"{key}-view-{hit.id}", on_click=on_change, kwargs={"view": hit.id},
                          type="tertiary", help=md(hit.path))
                b2.button("More like this", key=f"{key}-like-{hit.id}", on_click=on_more_like, args=(hit.id,),
                          type="tertiary")
    if rest > 0:
        st.button(f"Show {min(rest, PAGE)} more ({shown} of {shown + rest} shown)", key=f"{key}-more",
                  on_click=lambda: st.session_state.update(_shown=shown + PAGE))


def thumbnail(library, image_id: int, size: int) -> None:
    try:
        st.image(str(library.thumbnail(image_id, size)), width="stretch")
    except ImgSearchError as e:
        st.warning(md(e))


def detail(library, image_id: int, key: str = "detail", close: bool = True) -> None:
    """Larger view: path, size, dimensions, date taken, and the most similar images."""
    row = library.image(image_id)
    with st.container(border=True):
        left, right = st.columns([3, 2])
        with right:
            st.subheader(md(row.name), anchor=False)
            st.markdown("**Path**")
            st.code(visible(row.path), language=None, wrap_lines=True)
            st.markdown(f"**Size** {human_bytes(row.size)}")
            st.markdown(f"**Dimensions** {row.width} × {row.height} px" if row.width else "**Dimensions** unknown")
            st.markdown(f"**Taken** {md(row.taken_at.replace('T', ' '))}"
                        + (f" {md(row.taken_offset)}" if row.taken_offset and row.taken_source == "exif" else "")
                        + (" (file date: no EXIF date)" if row.taken_source == "file" else "") if row.taken_at
                        else "**Taken** unknown (no EXIF date)")
            if row.gps_lat is not None:
                st.markdown(f"**Place** {row.gps_lat:.5f}, {row.gps_lon:.5f}")
            if row.camera_make or row.camera_model:
                st.markdown(f"**Camera** {md(' '.join(x for x in (row.camera_make, row.camera_model) if x))}")
            b1, b2 = st.columns(2)
            b1.button("More like this", key=f"{key}-like", on_click=on_more_like, args=(row.id,), type="primary",
                      width="stretch")
            if close:
                b2.button("Close", key=f"{key}-close", on_click=on_change, kwargs={"view": None},
                          width="stretch")
        with left:
            thumbnail(library, row.id, library.PREVIEW)
        similar = library.search(ids=[row.id], k=COLUMNS, exclude_ids=[row.id])
        if similar:
            st.markdown("**Similar images**")
            grid(library, similar, key=f"{key}-similar")


def viewed(library, image_id: int | None) -> None:
    """The detail view the address asks for (view=), if any."""
    if image_id is not None:
        try:
            detail(library, image_id)
        except ImgSearchError as e:  # a stale or mistyped view= must not hide the page below
            st.error(md(e))


def status_panel(settings: Settings) -> dict | None:
    st.header("Library")
    job = index_jobs(str(settings.home)).current
    status = cached_status(settings, job.finished if job else None, st.session_state.get("_version"))
    if status is None:
        st.info(f"No library yet at {md(settings.home)}. Index a folder below to start.")
        return None
    st.markdown(f"**Images** {status['images']}  \n**Failures** {status['failures']}  \n"
                f"**Disk** {human_bytes(status['disk_bytes'])}")

    label = the_library(settings).model_label
    st.markdown(f"**Model** {md(label)}")
    mine = [m for m in status["models"] if m["model"] == label]
    for m in mine:
        st.caption(f"{m['vectors']} vectors, dim {m['dim']}, index {md(m['index_state'])}")
    if not any(m["vectors"] for m in mine):
        st.caption("no vectors for this model yet: index a folder")
    others = [m for m in status["models"] if m["model"] != label and m["vectors"]]
    if others:
        st.caption("Also in the library: " + "; ".join(f"{md(m['model'])} ({m['vectors']} vectors)" for m in others))
    run = status.get("last_run")
    if run and run.get("finished_at"):
        st.markdown(f"**Last indexed** {when(run['finished_at'])}"
                    + (" (interrupted)" if run.get("interrupted") else ""))
    if status["failed_files"]:
        with st.expander(f"Files that failed ({status['failures']})"):
            for f in status["failed_files"]:
                st.caption(f"{md(f['path'])}: {md(f['reason'])}")
    return status


def follow_changes(settings: Settings) -> None:
    """Redraw the page when another process (a watcher, an index run) changed the library, so new photos
    appear in the results without a reload; the warm Library reloads its index on the same counter."""

    @st.fragment(run_every=2.0)
    def check() -> None:
        job = index_jobs(str(settings.home)).current
        if job is not None and job.running:
            return  # this page's own run: its progress bar redraws the page once, when it ends
        if library_version(settings) != st.session_state.get("_version"):
            st.rerun()

    check()


def typed_folder(text: str | None) -> str:
    """A folder typed into the page, in full: the page's user cannot see the server's current folder, which a
    relative path would be read from."""
    text = (text or "").strip()
    return os.path.abspath(os.path.expanduser(text)) if text else ""


def index_panel(settings: Settings) -> None:
    st.header("Index a folder")
    jobs = index_jobs(str(settings.home))
    job = jobs.current
    with st.form("index-form", border=False):
        folder = st.text_input("Folder to index", key="w_index", placeholder="/home/me/Pictures")
        submitted = st.form_submit_button("Index", disabled=bool(job and job.running))
    if submitted:
        folder = typed_folder(folder)
        if not folder:
            st.error("Type the folder to index.")
        elif not os.path.exists(folder):
            st.error(f"No such folder: {md(folder)}")
        else:
            try:
                job = jobs.start(settings, folder)
            except ImgSearchError as e:
                st.error(md(e))
    if job is None:
        return
    if job.running:
        @st.fragment(run_every=1.0)
        def progress() -> None:
            j = jobs.current
            if j is not None and j.running:
                name = os.path.basename(j.folder.rstrip(os.sep)) or j.folder
                if j.stage:
                    st.progress(j.done / max(j.total, 1), text=f"Search index: {md(j.stage)}, {j.done:,}/{j.total:,} "
                                                                "vectors")
                elif j.total:
                    st.progress(j.done / j.total, text=f"Indexing {md(name)}: {j.done}/{j.total} images")
                else:  # the model loads and the folder is listed before the first image
                    st.progress(0.0, text=f"Indexing {md(name)}: loading the model, listing files…")
            else:  # done: redraw the whole page so the status panel and the results include the new images
                st.rerun()

        progress()
    elif job.error:
        st.error(f"Indexing {md(job.folder)} failed: {md(job.error)}")
    elif job.report is not None:
        r = job.report
        if r.found_nothing:  # as `imgsearch index` says it
            st.warning(f"Indexed {md(job.folder)}: no images found there (hidden folders and imgsearch libraries "
                       "are skipped)")
        else:
            st.success(f"Indexed {md(job.folder)}: {r.new} new, {r.updated} updated, {r.removed} removed, "
                       f"{len(r.failed)} failed ({r.seconds:.1f}s)")


def search_form() -> None:
    with st.form("search"):
        st.text_input("Search for", key="w_q", placeholder="a dog on a beach", max_chars=MAX_TEXT)
        c1, c2, c3, c4 = st.columns([3, 3, 1, 1])
        c1.text_input("But not", key="w_not", placeholder="people", max_chars=MAX_TEXT)
        c2.text_input("Only in folder", key="w_under", placeholder="/home/me/Pictures/2024")
        c3.number_input("Results", key="w_k", min_value=1, max_value=MAX_K, step=5)
        # No value=: the URL sets it through session state (None = no minimum).
        c4.number_input("Min score", key="w_min", min_value=-1.0, max_value=1.0, step=0.05, placeholder="any")
        with st.expander("When and where", expanded=any(st.session_state.get(f"w_{key}") for key in WHEN_WHERE)):
            w1, w2, w3, w4 = st.columns([2, 2, 3, 2])
            w1.text_input("Taken from", key="w_after", placeholder="2023 or 2023-06-01",
                          help="YYYY, YYYY-MM, YYYY-MM-DD or an ISO timestamp")
            w2.text_input("Taken until (end of)", key="w_before", placeholder="2023-12",
                          help="Up to the end of this year, month or day (a full timestamp is excluded)")
            w3.text_input("Near (lat,lon[,km])", key="w_near", placeholder="48.8584,2.2945,5",
                          help="Photos with GPS within this many km (default 5) of the point")
            w4.text_input("Camera", key="w_camera", placeholder="pixel 7")
        with st.expander("Search with an example image", expanded=bool(st.session_state.get("upload"))):
            st.file_uploader(f"An image like the ones you want (up to {MAX_UPLOAD_MB} MB; kept in memory only)",
                             type=UPLOAD_TYPES, key="w_upload", max_upload_size=MAX_UPLOAD_MB)
        st.form_submit_button("Search", type="primary", on_click=on_search)


def example_header(library, image_id: int) -> str:
    """Above a 'more like this' grid: the example image itself. Returns its file name."""
    row = library.image(image_id)
    left, right = st.columns([1, 7], vertical_alignment="center")
    with left:
        thumbnail(library, row.id, library.THUMB)
    with right:
        st.markdown(f"**Images like {md(row.name)}**")
        st.button("Details", key="example-view", on_click=on_change, kwargs={"view": row.id}, type="tertiary")
    return row.name


def results(settings: Settings, status: dict | None, p: Params) -> None:
    upload = st.session_state.get("upload")
    if not (p.q or p.like or upload or p.view is not None):
        if status is not None and status["images"]:
            st.caption("Type what you remember, e.g. “a red car at night”, or upload an example image.")
        return
    if status is None or not status["images"]:
        st.info("The library is empty: index a folder with the form in the sidebar (or run `imgsearch index PATH`), "
                "then search.")
        return
    library = warm_library(settings)
    viewed(library, p.view)
    if not (p.q or p.like or upload):
        return
    request = request_of(st.query_params, upload)
    example = None if upload else p.example  # with an upload, one 👍 refines it: not "more like this"
    t0 = time.perf_counter()
    hits = library.run(request)
    took = time.perf_counter() - t0
    said = ((example is not None and example_header(library, example), "images like {}"),
            (upload and upload[0], "images like the uploaded {}"), (p.q, "“{}”"), (p.neg, "not “{}”"),
            (p.under, "in {}"), (p.after, "taken from {}"), (p.before, "until the end of {}"),
            (p.near, "near {}"), (p.camera, "camera {}"))
    what = [form.format(md(value)) for value, form in said if value]
    if not hits:
        st.info("No results for " + ", ".join(what) + (f" with score ≥ {p.min_score:g}" if p.min_score is not None
                                                         else "") + ".")
        return
    said, save = st.columns([6, 1], vertical_alignment="center")
    said.caption(f"{len(hits)} results for {', '.join(what)} ({took * 1000:.0f} ms)")
    with save.popover("Save as album"):
        if upload:  # an album's search runs again later, from files in the library
            st.caption(f"An album keeps its example images as files, and the uploaded {md(upload[0])} is not a "
                       "file in the library: index its folder, then save **More like this** on it.")
        else:
            save_album_form(library, request)
    if (p.like or p.unlike) and example is None:
        left, right = st.columns([6, 1], vertical_alignment="center")
        left.markdown(f"Refined by 👍 {len(p.like)} · 👎 {len(p.unlike)}: the search moves toward the images you "
                      "liked and away from the others.")
        right.button("Clear marks", key="marks-clear", on_click=on_change, kwargs={"like": (), "unlike": ()},
                     type="tertiary")
    if hits[0].relevant is False:  # the best is under the model's calibrated floor (None: no floor applies)
        st.info("No good matches; closest results")
    views(library, hits, "hit", p)


def save_album_form(library, request: SearchRequest) -> None:
    """Keep this search, marks included, as an album (a saved search that stays current)."""
    with st.form("save-album", border=False):
        name = st.text_input("Album name", max_chars=100, key="w_album_name")
        if st.form_submit_button("Save"):
            try:  # the search as asked: the page's own exclusions and relevance marks are not part of it
                # With a min score, as `album save --min-score`: every photo above it (Results: how many shown)
                k = None if request.min_score is not None else request.k
                album = library.save_album(name, request=request.with_(exclude_ids=(), relevance=False), k=k)
                st.success(f"Saved album {md(album.name)} ({album.count} photos); see Albums in the sidebar")
            except ImgSearchError as e:
                st.error(md(e))


def views(library, hits, key: str, p: Params | None = None) -> None:
    """Hits as a thumbnail grid, on a map and on a timeline (whose brush narrows the search's dates)."""
    tab_grid, tab_map, tab_time = st.tabs(["Grid", "Map", "Timeline"])
    with tab_grid:
        grid(library, hits, key, p)
    with tab_map:
        photo_map(library, hits, key)
    with tab_time:
        timeline(hits, key, narrow=p is not None)


# --- map and timeline ---------------------------------------------------------------------------------
def lon_frame(lons) -> float:
    """The meridian at the middle of the narrowest arc holding every longitude (the complement of the widest
    gap between them), so that unwrap() keeps a set of places continuous, across the antimeridian too:
    Fiji's 179.9 and -179.9 are 0.2 degrees apart, not 359.8."""
    xs = sorted(x % 360.0 for x in lons)
    gaps = [(xs[(i + 1) % len(xs)] - xs[i]) % 360.0 for i in range(len(xs))]
    widest = max(range(len(xs)), key=gaps.__getitem__)
    middle = xs[(widest + 1) % len(xs)] + (360.0 - gaps[widest]) % 360.0 / 2
    return (middle + 180.0) % 360.0 - 180.0


def unwrap(lon: float, frame: float) -> float:
    """``lon`` moved by whole turns to within 180 degrees of ``frame`` (may leave [-180, 180])."""
    return frame + (lon - frame + 180.0) % 360.0 - 180.0


def pins(hits, cells: int = 24) -> list[dict]:
    """Photos with GPS grouped on a grid laid over their extent (``cells`` across): one pin per cell, at its
    photos' mean position, sized by how many it holds, listing them best first."""
    placed = [h for h in hits if h.gps_lat is not None and h.gps_lon is not None]
    if not placed:
        return []
    # longitudes unwrapped around the places' own middle: pins across the antimeridian stay neighbours (the
    # map draws longitudes past 180 on the next copy of the world, where they belong)
    frame = lon_frame([h.gps_lon for h in placed])
    lon = {h.id: unwrap(h.gps_lon, frame) for h in placed}
    cell = max(max(h.gps_lat for h in placed) - min(h.gps_lat for h in placed),
               max(lon.values()) - min(lon.values()), 1e-4) / cells
    groups: dict[tuple[int, int], list] = {}
    for h in placed:
        groups.setdefault((int(h.gps_lat // cell), int(lon[h.id] // cell)), []).append(h)
    out = []
    for members in groups.values():
        n = len(members)
        name = visible(os.path.basename(members[0].path))  # a deck.gl tooltip is plain text
        out.append({"lat": sum(h.gps_lat for h in members) / n, "lon": sum(lon[h.id] for h in members) / n,
                    "count": n, "ids": ",".join(str(h.id) for h in members), "radius": 7 + 4 * n ** 0.5,
                    "label": str(n) if n > 1 else "", "title": f"{n} photos" if n > 1 else name})
    return out


def photo_map(library, hits, key: str) -> None:
    """The photos with GPS as pins on a plain canvas (no tile server needed; a base map is optional). A
    click on a pin opens its photo, or lists a cluster's photos, below the map."""
    import math

    import pydeck as pdk
    from pydeck.types import String

    points = pins(hits)
    if not points:
        st.info("None of these photos has a GPS position.")
        return
    lats, lons = [p["lat"] for p in points], [p["lon"] for p in points]
    span = max(max(lats) - min(lats), max(lons) - min(lons), 0.005)
    # deck.gl draws the world 512 px wide at zoom 0: fit the pins' extent in about 600 px
    middle = (max(lons) + min(lons)) / 2  # pins() unwrapped the longitudes around it: the grid follows
    view = pdk.ViewState(latitude=(max(lats) + min(lats)) / 2, longitude=middle,
                         zoom=max(0.0, min(16.0, math.log2(600 / 512 * 360 / span))))
    # Offline there is no base map: faint lines of latitude and longitude give the pins their bearings.
    step = next(s for s in (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30) if span / s <= 12)
    west, east = max(middle - 180, min(lons) - 2 * span), min(middle + 180, max(lons) + 2 * span)
    south, north = max(-85.0, min(lats) - 2 * span), min(85.0, max(lats) + 2 * span)
    lines = [{"path": [[x * step, south], [x * step, north]]} for x in range(math.ceil(west / step),
                                                                             math.floor(east / step) + 1)]
    lines += [{"path": [[west, y * step], [east, y * step]]} for y in range(math.ceil(south / step),
                                                                            math.floor(north / step) + 1)]
    layers = [pdk.Layer("PathLayer", lines, id="grid", get_path="path", get_color=[160, 160, 160, 90],
                        width_min_pixels=1),
              pdk.Layer("ScatterplotLayer", points, id="photos", get_position=["lon", "lat"], get_radius="radius",
                        radius_units=String("pixels"), get_fill_color=[214, 39, 40, 210],
                        get_line_color=[255, 255, 255], stroked=True, line_width_min_pixels=1.5, pickable=True),
              pdk.Layer("TextLayer", [p for p in points if p["label"]], id="counts", get_position=["lon", "lat"],
                        get_text="label", get_size=13, get_color=[255, 255, 255])]
    tiles = st.toggle("Base map (loads map tiles from the internet)", key=f"{key}-tiles")
    deck = pdk.Deck(layers=layers, initial_view_state=view, tooltip={"text": "{title}"},
                    **({"map_provider": "carto", "map_style": "light"} if tiles else {"map_provider": None}))
    on_map = hash(frozenset(i for p in points for i in p["ids"].split(",")))  # a click is on these photos' pins
    event = st.pydeck_chart(deck, on_select="rerun", selection_mode="single-object", key=f"{key}-map-{on_map}",
                            height=460)
    st.caption(f"{sum(p['count'] for p in points)} of {len(hits)} photos have a GPS position; click a pin. "
               f"Grid lines every {step:g}°.")
    chosen = (event.selection.get("objects") or {}).get("photos") or []
    if chosen:
        ids = [int(i) for i in str(chosen[0]["ids"]).split(",")]
        if len(ids) == 1:
            detail(library, ids[0], key=f"{key}-pin", close=False)
        else:
            st.markdown(f"**{len(ids)} photos here**")
            grid(library, [h for h in hits if h.id in set(ids)], key=f"{key}-pin")


def timeline(hits, key: str, narrow: bool = True) -> None:
    """A histogram of the photos' capture dates; with ``narrow``, dragging across it searches those dates
    only (the range becomes --after/--before)."""
    from datetime import date

    import altair as alt
    import pandas as pd

    taken = sorted(h.taken_at[:10] for h in hits if h.taken_at)
    if not taken:
        st.info("None of these photos has a capture date.")
        return
    # ISO text, as Altair would send dates: pandas before 3.0 holds no date past 2262 or before 1677, and a
    # camera's "9999:12:31" or a year typed as 0201 must not take the page down.
    frame = pd.DataFrame({"taken": [f"{day}T00:00:00" for day in taken]})
    days = (date.fromisoformat(taken[-1]) - date.fromisoformat(taken[0])).days
    unit = "yearmonthdate" if days <= 92 else "yearmonth" if days <= 3660 else "year"
    chart = alt.Chart(frame).mark_bar(color="#d62728").encode(
        x=alt.X(f"{unit}(taken):T", title="taken"), y=alt.Y("count():Q", title="photos"))
    if narrow:
        chart = chart.add_params(alt.selection_interval(encodings=["x"], name="when"))
        st.altair_chart(chart, on_select=partial(on_brush, f"{key}-timeline"), key=f"{key}-timeline",
                        width="stretch")
        st.caption("Drag across the bars to search those dates only.")
    else:
        st.altair_chart(chart, width="stretch")
    st.caption(f"{len(taken)} of {len(hits)} photos have a capture date.")


def on_brush(key: str) -> None:
    """The timeline's brush moved: its ends become the search's first and last day."""
    from datetime import datetime, timezone

    ends = next(iter((st.session_state[key].selection.get("when") or {}).values()), None)
    if not ends:
        return

    def day(v) -> str:
        if isinstance(v, (int, float)):  # Vega-Lite gives times as milliseconds since 1970
            return datetime.fromtimestamp(v / 1000, timezone.utc).date().isoformat()
        return str(v)[:10]

    on_change(after=day(min(ends)), before=day(max(ends)), view=None)


# --- albums -------------------------------------------------------------------------------------------
def albums_page(settings: Settings, status: dict | None, p: Params) -> None:
    """Every album (a saved search that stays current), and the one opened: its photos as a grid, on the map
    and on the timeline; rename, delete, export."""
    if status is None or not status["images"]:
        st.info("The library is empty: index a folder with the form in the sidebar first.")
        return
    library = warm_library(settings)
    if p.album:
        return album_view(library, p.album, p.view)
    albums = library.albums()
    st.header("Albums", anchor=False)
    if not albums:
        st.info("No albums yet: search, mark results with 👍/👎 to refine it, then **Save as album** (or run "
                "`imgsearch album save NAME QUERY`).")
    for album in albums:
        c1, c2, c3 = st.columns([3, 1, 6], vertical_alignment="center")
        c1.button(md(album.name), key=f"album-open-{album.name}", on_click=on_change,
                  kwargs={"page": "albums", "album": album.name}, type="tertiary")
        c2.markdown(f"{album.count} photos")
        c3.caption(md(album.problem) if album.problem else f"{md(album.query)} · changed {when(album.changed_at)}")


def album_view(library, name: str, view: int | None = None) -> None:
    """One album: its photos, and forms to rename, export or delete it. An album whose saved search no longer
    runs (its folder gone...) says why and can still be renamed or deleted here."""
    try:
        album = library.album(name)
        name = album.name
    except ImgSearchError as e:
        st.error(md(e))
        album, kept = None, next((a for a in library.albums() if a.name.casefold() == name.casefold()), None)
        if kept is None:  # no such album
            st.button("All albums", on_click=on_change, kwargs={"album": ""})
            return
        name = kept.name
    top, back = st.columns([6, 1], vertical_alignment="center")
    top.header(f"Album: {md(name)}", anchor=False)
    back.button("All albums", on_click=on_change, kwargs={"album": ""}, type="tertiary")
    if album:
        st.caption(f"{album.count} photos · {md(album.query)}")
        viewed(library, view)
    with st.expander("Rename, delete or export", expanded=album is None):
        with st.form("album-rename", border=False):
            new = st.text_input("New name", value=name, max_chars=100, key="w_album_rename")
            if st.form_submit_button("Rename"):
                try:
                    library.rename_album(name, new)
                    on_change(album=new.strip())
                    st.rerun()
                except ImgSearchError as e:
                    st.error(md(e))
        if album:
            with st.form("album-export", border=False):
                folder = st.text_input("Export to a new or empty folder", key="w_album_export",
                                       placeholder="/home/me/Desktop/beach")
                link = st.checkbox("Symbolic links instead of copies", key="w_album_link")
                if st.form_submit_button("Export"):
                    try:
                        target = typed_folder(folder)
                        if not target:
                            raise UsageError("type the folder to export to")
                        written = library.export_album(name, target, link=link)
                        st.success(f"Exported {len(written)} photos to {md(target)}")
                    except ImgSearchError as e:
                        st.error(md(e))
        with st.form("album-delete", border=False):
            sure = st.checkbox("Delete this album (its saved search only; no photo is touched)", key="w_album_sure")
            if st.form_submit_button("Delete"):
                if not sure:
                    st.warning("Tick the box to delete the album.")
                else:
                    try:  # another page or process may have deleted or renamed it meanwhile
                        library.delete_album(name)
                        on_change(album="")
                        st.rerun()
                    except ImgSearchError as e:
                        st.error(md(e))
    if album and album.hits:
        views(library, album.hits, "album")
    elif album:
        st.info("No photos in this album now.")


def main() -> None:
    st.set_page_config(page_title="imgsearch", page_icon="🔎", layout="wide")
    try:
        settings = Settings.from_env()  # `imgsearch ui` passes --home, --model, ... as IMGSEARCH_* variables
    except ImgSearchError as e:
        st.error(md(e))
        return
    p = parse_params(st.query_params)
    sync_widgets(p)
    st.session_state["_version"] = library_version(settings)
    with st.sidebar:
        st.radio("Page", ["Search", "Albums"], key="w_page", horizontal=True, label_visibility="collapsed",
                 on_change=lambda: on_change(page="albums" if st.session_state.w_page == "Albums" else "",
                                             album="", view=None))
        try:
            status = status_panel(settings)
        except ImgSearchError as e:
            st.error(md(e))
            status = None
        index_panel(settings)
        follow_changes(settings)
    st.title("imgsearch")
    for problem in p.problems:
        st.warning(f"Ignored part of the address: {md(problem)}")
    if p.page != "albums":
        search_form()
    try:
        if p.page == "albums":
            albums_page(settings, status, p)
        else:
            results(settings, status, p)
    except ParamError as e:  # the library names the parameter; the page says which field and value
        raw = st.query_params
        field = {"texts": ("Search for", None), "not": ("But not", None),  # too long to repeat
                 "under": ("Folder", p.under), "min_score": ("Minimum score", raw.get("min")),
                 "k": ("Results", raw.get("k")), "like": ("Liked images", raw.get("like")),
                 "unlike": ("Unliked images", raw.get("unlike")),
                 "after": ("Taken from", p.after), "before": ("Taken until", p.before), "near": ("Near", p.near),
                 "camera": ("Camera", p.camera)}
        label, value = field.get(e.param, (e.param, None))
        st.error(f"{label} {md(shortened(value, 80))}: {md(e.detail)}" if value not in (None, "")
                 else f"{label}: {md(e.detail)}")
        if e.param in ("like", "unlike"):  # e.g. a marked photo since removed; Search keeps the marks
            st.button("Clear marks", key="marks-clear", on_click=on_change, kwargs={"like": (), "unlike": ()})
    except ImgSearchError as e:
        st.error(md(e))
    except Exception as e:  # a bug: one line for the user, the traceback for the server log
        log.exception("search failed")
        st.error(f"Internal error: {type(e).__name__}: {md(e)} (details in the server log; please report it)")


if __name__ == "__main__":
    main()
