"""Query languages: NLLB language codes, a script-based guess, and the English-only model hint.

Standard library only (the cold query path imports it). NLLB-CLIP's tokenizer starts every text with a language
token; other multilingual towers ignore it. Script alone cannot tell Latin-script languages apart, so only other
scripts are guessed; Latin text uses --lang, the library's recorded language, then English.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections import Counter

from .errors import UsageError

DEFAULT = "eng_Latn"
PRESET = "multilingual"

# FLORES-200 codes, as NLLB's tokenizer spells its language tokens.
NLLB_CODES = frozenset("""
    ace_Arab ace_Latn acm_Arab acq_Arab aeb_Arab afr_Latn ajp_Arab aka_Latn amh_Ethi apc_Arab arb_Arab
    ars_Arab ary_Arab arz_Arab asm_Beng ast_Latn awa_Deva ayr_Latn azb_Arab azj_Latn bak_Cyrl bam_Latn
    ban_Latn bel_Cyrl bem_Latn ben_Beng bho_Deva bjn_Arab bjn_Latn bod_Tibt bos_Latn bug_Latn bul_Cyrl
    cat_Latn ceb_Latn ces_Latn cjk_Latn ckb_Arab crh_Latn cym_Latn dan_Latn deu_Latn dik_Latn dyu_Latn
    dzo_Tibt ell_Grek eng_Latn epo_Latn est_Latn eus_Latn ewe_Latn fao_Latn pes_Arab fij_Latn fin_Latn
    fon_Latn fra_Latn fur_Latn fuv_Latn gla_Latn gle_Latn glg_Latn grn_Latn guj_Gujr hat_Latn hau_Latn
    heb_Hebr hin_Deva hne_Deva hrv_Latn hun_Latn hye_Armn ibo_Latn ilo_Latn ind_Latn isl_Latn ita_Latn
    jav_Latn jpn_Jpan kab_Latn kac_Latn kam_Latn kan_Knda kas_Arab kas_Deva kat_Geor knc_Arab knc_Latn
    kaz_Cyrl kbp_Latn kea_Latn khm_Khmr kik_Latn kin_Latn kir_Cyrl kmb_Latn kon_Latn kor_Hang kmr_Latn
    lao_Laoo lvs_Latn lij_Latn lim_Latn lin_Latn lit_Latn lmo_Latn ltg_Latn ltz_Latn lua_Latn lug_Latn
    luo_Latn lus_Latn mag_Deva mai_Deva mal_Mlym mar_Deva min_Latn mkd_Cyrl plt_Latn mlt_Latn mni_Beng
    khk_Cyrl mos_Latn mri_Latn zsm_Latn mya_Mymr nld_Latn nno_Latn nob_Latn npi_Deva nso_Latn nus_Latn
    nya_Latn oci_Latn gaz_Latn ory_Orya pag_Latn pan_Guru pap_Latn pol_Latn por_Latn prs_Arab pbt_Arab
    quy_Latn ron_Latn run_Latn rus_Cyrl sag_Latn san_Deva sat_Beng scn_Latn shn_Mymr sin_Sinh slk_Latn
    slv_Latn smo_Latn sna_Latn snd_Arab som_Latn sot_Latn spa_Latn als_Latn srd_Latn srp_Cyrl ssw_Latn
    sun_Latn swe_Latn swh_Latn szl_Latn tam_Taml tat_Cyrl tel_Telu tgk_Cyrl tgl_Latn tha_Thai tir_Ethi
    taq_Latn taq_Tfng tpi_Latn tsn_Latn tso_Latn tuk_Latn tum_Latn tur_Latn twi_Latn tzm_Tfng uig_Arab
    ukr_Cyrl umb_Latn urd_Arab uzn_Latn vec_Latn vie_Latn war_Latn wol_Latn xho_Latn ydd_Hebr yor_Latn
    yue_Hant zho_Hans zho_Hant zul_Latn
""".split())

# Unicode name prefix of a letter -> the language its script most likely means for a photo query.
_SCRIPTS = (
    ("HANGUL", "kor_Hang"), ("HIRAGANA", "jpn_Jpan"), ("KATAKANA", "jpn_Jpan"), ("CJK", "zho_Hans"),
    ("CYRILLIC", "rus_Cyrl"), ("GREEK", "ell_Grek"), ("ARABIC", "arb_Arab"), ("HEBREW", "heb_Hebr"),
    ("DEVANAGARI", "hin_Deva"), ("BENGALI", "ben_Beng"), ("THAI", "tha_Thai"), ("TAMIL", "tam_Taml"),
    ("TELUGU", "tel_Telu"), ("KANNADA", "kan_Knda"), ("MALAYALAM", "mal_Mlym"), ("GUJARATI", "guj_Gujr"),
    ("GURMUKHI", "pan_Guru"), ("ORIYA", "ory_Orya"), ("SINHALA", "sin_Sinh"), ("GEORGIAN", "kat_Geor"),
    ("ARMENIAN", "hye_Armn"), ("ETHIOPIC", "amh_Ethi"), ("KHMER", "khm_Khmr"), ("LAO", "lao_Laoo"),
    ("MYANMAR", "mya_Mymr"), ("TIBETAN", "bod_Tibt"), ("LATIN", "Latn"),
)
_UKRAINIAN = set("іїєґІЇЄҐ")
_PERSIAN = set("پچژگ")


def check(code: str | None) -> str | None:
    """The code itself when NLLB knows it (None passes through); else a UsageError naming close ones."""
    code = (code or "").strip()
    if not code:  # IMGSEARCH_LANG=" " is not set
        return None
    fixed = code if code in NLLB_CODES else {c.lower(): c for c in NLLB_CODES}.get(code.lower())
    if fixed:
        return fixed
    near = difflib.get_close_matches(code, sorted(NLLB_CODES), n=3, cutoff=0.75)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise UsageError(f"unknown language code {code[:40]!r}{hint}; use an NLLB code such as kor_Hang, deu_Latn or "
                     "jpn_Jpan (see README, Multilingual search)")


def detect(text: str) -> str | None:
    """The NLLB code a query's script points to, or None for Latin-script (or letterless) text."""
    names = [unicodedata.name(ch, "") for ch in text if ch.isalpha()]
    counts = Counter(next((lang for prefix, lang in _SCRIPTS if name.startswith(prefix)), "other") for name in names)
    if not counts:
        return None
    if "jpn_Jpan" in counts and counts.get("zho_Hans"):  # kanji among kana is Japanese
        counts["jpn_Jpan"] += counts.pop("zho_Hans")
    best = max(counts, key=counts.get)
    if best in ("Latn", "other"):
        return None
    if best == "rus_Cyrl" and _UKRAINIAN & set(text):
        return "ukr_Cyrl"
    if best == "arb_Arab" and _PERSIAN & set(text):
        return "pes_Arab"
    return best


def query_language(text: str, given: str | None = None, recorded: str | None = None) -> str:
    """Language for one query text: --lang, else its script, else the library's language, else English."""
    return given or detect(text) or recorded or DEFAULT


def non_latin(texts) -> bool:
    """Whether any text is mostly letters of a script other than Latin (what an English model can't read)."""
    return any(detect(t) is not None for t in texts if isinstance(t, str))


def english_only_hint(label: str) -> str:
    return (f"hint: {label} is an English-only model and this query is not in Latin script; "
            f"for other languages install imgsearch[multilingual] and index with `imgsearch --model {PRESET} index "
            "PATH` (see README, Multilingual search)")
