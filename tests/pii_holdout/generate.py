"""Held-out PII/secret corpus: writes one JSONL file per entity type plus negatives.jsonl (README.md here).

Written independently of the detectors and of tests/pii_corpus/, from the public formats of each value
(E.164 and national numbering plans via libphonenumber, card brand prefixes and Luhn, the SWIFT IBAN
registry, SSA's SSN rules, RFC 4291/5952/6874 addresses, the published token layouts of the providers).

    .venv/bin/python tests/pii_holdout/generate.py           # (re)write the files
    .venv/bin/python tests/pii_holdout/generate.py --check   # regenerate in memory, compare, audit every span

Deterministic: one fixed seed, standard library plus phonenumbers and python-stdnum (project dependencies).
Every entity is inserted through a template slot, so its span is known by construction; `--check` then
re-validates each span on its own (Luhn, mod-97, SSN rules, ipaddress, libphonenumber for the intended
region, token layouts) and scans the rest of every text for anything that looks like an unlabeled entity.
"""

# Multilingual corpus text contains full-width and typographic punctuation on purpose.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import base64
import ipaddress
import itertools
import json
import random
import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers
import stdnum.iban
from phonenumbers import PhoneNumber, PhoneNumberFormat, PhoneNumberType

SEED = 20250611
HERE = Path(__file__).resolve().parent
TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "SECRET")
PER_TYPE = 260
NEGATIVES = 660

ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "-_"
HEX = "0123456789abcdef"
UPPER_ALNUM = string.ascii_uppercase + string.digits


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Span:
    type: str
    start: int
    end: int
    meta: str  # phone: intended region; secret: token family; others: a short note


@dataclass
class Record:
    id: str
    text: str
    spans: list[Span]
    kind: str

    def to_json(self) -> str:
        ents = [{"type": s.type, "start": s.start, "end": s.end} for s in self.spans]
        return json.dumps({"id": self.id, "text": self.text, "entities": ents, "kind": self.kind}, ensure_ascii=False)


class Doc:
    """Concatenates text and entity values, recording each value's span."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.spans: list[Span] = []

    def add(self, s: str) -> None:
        self.parts.append(s)
        self.size += len(s)

    def entity(self, typ: str, value: str, meta: str) -> None:
        self.spans.append(Span(typ, self.size, self.size + len(value), meta))
        self.add(value)

    def text(self) -> str:
        return "".join(self.parts)


def words(s: str) -> list[str]:
    return s.split()


def bars(s: str) -> list[str]:
    return s.split("|")


# ------------------------------------------------------------------------------------------ name data

# "Display|ascii" where the display form is not Latin; the ascii form builds e-mail local parts.
FIRST: dict[str, list[str]] = {
    "en": words(
        "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard Susan "
        "Joseph Jessica Thomas Sarah Charles Karen Christopher Nancy Daniel Lisa Matthew Emily Anthony "
        "Margaret Mark Sandra Steven Ashley Paul Kimberly Andrew Donna Joshua Michelle Kevin Amanda Brian "
        "Melissa George Rebecca Jason Laura Ryan Rachel Eric Nicole Justin Megan Brandon Olivia Tyler Hannah "
        "Aaron Priya Aisha DeShawn Mateo Siobhan Ngozi Keegan Marisol Tomasz Yusuf Imani Declan"
    ),
    "de": words(
        "Lukas Leon Finn Jonas Paul Felix Maximilian Elias Noah Anna Lena Sophie Marie Hannah Emma Mia Lea "
        "Laura Julia Jürgen Günther Sabine Ursula Stefan Katrin Björn Dörte Matthias Kerstin"
    ),
    "fr": words(
        "Jean Marie Pierre Camille Nicolas Julie Thomas Léa Antoine Chloé Hélène François Manon Élodie Maxime "
        "Inès Benoît Céline Théo Margaux Aurélien Solène"
    ),
    "es": words(
        "Alejandro Lucía Pablo María Javier Carmen Sergio Laura Diego Marta Álvaro Paula Andrés Sofía José "
        "Elena Íñigo Nuria Ramón Begoña"
    ),
    "it": words(
        "Giuseppe Giovanni Antonio Mario Luca Francesca Giulia Chiara Sara Alessandro Marco Elena Matteo "
        "Federica Lorenzo Valentina Niccolò"
    ),
    "nl": words("Daan Sem Lucas Emma Julia Sophie Lotte Bram Thijs Sanne Fleur Jeroen Maarten Anouk Femke Joris"),
    "pt": words("João Maria Ana Pedro Lucas Gabriel Beatriz Mariana Rafael Juliana Thiago Camila Felipe Larissa"),
    "pl": words("Jakub Kacper Szymon Julia Zuzanna Maja Anna Piotr Krzysztof Agnieszka Małgorzata Tomasz Łukasz"),
    "nordic": words("Erik Lars Karl Anders Johan Maria Anna Emma Ingrid Astrid Sofia Nils Freja Magnus Sigrid Oskar"),
    "in": words("Aarav Vivaan Aditya Priya Ananya Diya Rohan Arjun Kavya Ishaan Sneha Rahul Meera Vikram"),
    "ja": [
        "太郎|taro",
        "花子|hanako",
        "健|ken",
        "美咲|misaki",
        "翔|sho",
        "さくら|sakura",
        "大輔|daisuke",
        "陽菜|hina",
        "拓也|takuya",
    ],
    "zh": ["伟|wei", "娜|na", "敏|min", "洋|yang", "静|jing", "磊|lei", "婷|ting", "强|qiang"],
    "ru": ["Иван|ivan", "Ольга|olga", "Дмитрий|dmitry", "Анна|anna", "Сергей|sergey", "Мария|maria"],
}
LAST: dict[str, list[str]] = {
    "en": words(
        "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Wilson "
        "Anderson Thomas Taylor Moore Jackson Martin Lee Thompson White Harris Clark Lewis Robinson Walker "
        "Young Allen King Wright Scott Nguyen Hill Green Adams Baker Campbell Mitchell Carter Roberts O'Brien "
        "Patel Kowalski Okafor Chen Nakamura Fitzgerald MacDonald O'Connor Delgado Abernathy"
    ),
    "de": words(
        "Müller Schmidt Schneider Fischer Weber Meyer Wagner Becker Schulz Hoffmann Schäfer Koch Bauer Richter "
        "Klein Wolf Schröder Neumann Schwarz Zimmermann Braun Krüger Hartmann Lange Krause Lehmann Köhler Böhm"
    ),
    "fr": words(
        "Martin Bernard Dubois Thomas Robert Richard Petit Durand Leroy Moreau Simon Laurent Lefèvre Michel "
        "Garcia Bertrand Roux Vincent Fournier Girard Bonnet Dupont Lambert Fontaine Rousseau Mercier Guérin"
    ),
    "es": words(
        "García Fernández González Rodríguez López Martínez Sánchez Pérez Gómez Martín Jiménez Ruiz Hernández "
        "Díaz Moreno Muñoz Álvarez Romero Navarro Torres Domínguez Vázquez Ramos Serrano Ibáñez"
    ),
    "it": words(
        "Rossi Russo Ferrari Esposito Bianchi Romano Colombo Ricci Marino Greco Bruno Gallo Conti Mancini "
        "Costa Giordano Rizzo Lombardi Moretti"
    ),
    "nl": words(
        "Jansen Visser Smit Meijer Mulder Bos Vos Peters Hendriks Dekker Brouwer Bakker Willems Kuipers "
        "Verhoeven Postma"
    ),
    "pt": words(
        "Silva Santos Oliveira Souza Rodrigues Ferreira Alves Pereira Lima Gomes Costa Ribeiro Martins Carvalho"
    ),
    "pl": words("Nowak Kowalski Wiśniewski Wójcik Kowalczyk Kamiński Lewandowski Zieliński Szymański Woźniak Mazur"),
    "nordic": words(
        "Andersson Johansson Karlsson Nilsson Eriksson Larsson Olsen Hansen Jensen Nielsen Lindqvist Haugen"
    ),
    "in": words("Sharma Verma Gupta Singh Kumar Patel Reddy Iyer Nair Menon Joshi Chatterjee Mukherjee Rao"),
    "ja": [
        "佐藤|sato",
        "鈴木|suzuki",
        "高橋|takahashi",
        "田中|tanaka",
        "伊藤|ito",
        "渡辺|watanabe",
        "山本|yamamoto",
        "中村|nakamura",
    ],
    "zh": ["王|wang", "李|li", "张|zhang", "刘|liu", "陈|chen", "杨|yang", "黄|huang", "赵|zhao"],
    "ru": ["Петров|petrov", "Смирнова|smirnova", "Иванов|ivanov", "Кузнецова|kuznetsova", "Попов|popov"],
}
NAME_LOCALE = {
    "en": "en",
    "de": "de",
    "fr": "fr",
    "es": "es",
    "it": "it",
    "nl": "nl",
    "pt": "pt",
    "pl": "pl",
    "sv": "nordic",
    "nb": "nordic",
    "da": "nordic",
    "fi": "nordic",
    "in": "in",
    "ja": "ja",
    "zh": "zh",
    "ru": "ru",
}

CITIES: dict[str, list[str]] = {
    "en": bars("Austin|Denver|Seattle|Boston|Chicago|Portland|Atlanta|Phoenix|Nashville|San Diego|Leeds|Toronto"),
    "de": bars("Berlin|Hamburg|München|Köln|Frankfurt am Main|Stuttgart|Leipzig|Düsseldorf|Dresden|Nürnberg"),
    "fr": ["Paris", "Lyon", "Marseille", "Toulouse", "Nantes", "Bordeaux", "Lille", "Strasbourg"],
    "es": ["Madrid", "Barcelona", "Valencia", "Sevilla", "Bilbao", "Málaga", "Zaragoza"],
    "it": ["Roma", "Milano", "Napoli", "Torino", "Bologna", "Firenze"],
    "nl": ["Amsterdam", "Rotterdam", "Utrecht", "Den Haag", "Eindhoven", "Groningen"],
    "pt": ["São Paulo", "Rio de Janeiro", "Lisboa", "Porto", "Belo Horizonte", "Curitiba"],
    "pl": ["Warszawa", "Kraków", "Gdańsk", "Wrocław", "Poznań"],
    "ja": ["東京", "大阪", "名古屋", "福岡", "札幌"],
    "zh": ["北京", "上海", "深圳", "杭州", "成都"],
}
US_PLACES = [
    ("Austin", "TX", "787"),
    ("Denver", "CO", "802"),
    ("Seattle", "WA", "981"),
    ("Boston", "MA", "021"),
    ("Chicago", "IL", "606"),
    ("Portland", "OR", "972"),
    ("Atlanta", "GA", "303"),
    ("Phoenix", "AZ", "850"),
    ("Nashville", "TN", "372"),
    ("San Diego", "CA", "921"),
    ("Columbus", "OH", "432"),
    ("Raleigh", "NC", "276"),
    ("Madison", "WI", "537"),
    ("Boise", "ID", "837"),
    ("Albany", "NY", "122"),
]
STREET_NAMES = words("Maple Oak Cedar Lincoln Washington Park Lake Hillcrest Sunset Willow Elm Highland")
STREET_DE = ["Haupt", "Bahnhof", "Garten", "Schiller", "Goethe", "Linden", "Berliner", "Kirch", "Wald", "Ring"]
STREET_FR = ["de la Paix", "Victor Hugo", "des Lilas", "du Moulin", "Pasteur", "de la République", "Jean Jaurès"]
STREET_ES = ["Mayor", "del Sol", "de Alcalá", "Gran Vía", "de la Constitución", "Real"]
STREET_IT = ["Roma", "Garibaldi", "Dante", "Mazzini", "Cavour", "Verdi"]
STREET_NL = ["Kerk", "Molen", "Dorps", "School", "Stations", "Linden"]
STREET_PT = ["das Flores", "Augusta", "XV de Novembro", "da Liberdade", "do Comércio"]
COMPANIES = bars(
    "Northwind Traders|Contoso Health|Globex Logistics|Initech Systems|Umbrella Freight|Acme Analytics|"
    "Blue Harbor Dental|Pinecrest Insurance|Lumen & Vale LLP|Brightline Energy|Kestrel Robotics|"
    "Fjordline Shipping|Müller & Söhne GmbH|Boulangerie Lefèvre|Tecnologías Andinas|Rossi Costruzioni|"
    "Van Dijk Installatietechniek|Silverleaf Travel|Quarry Hill Museum|Oakridge Photography|Harborview Clinic|"
    "Redwood Payroll|Tidewater Legal|Nimbus Cloudworks"
)
TLDS = (
    [".com"] * 8
    + [".io", ".co.uk", ".de", ".fr", ".com.au", ".net", ".org", ".nl", ".es", ".it", ".ch", ".se"]
    + [".museum", ".travel", ".photography", ".technology", ".consulting", ".agency", ".health", ".law"]
    + [".co.jp", ".com.br", ".ai", ".dev", ".app", ".info", ".ac.uk", ".co.nz", ".com.mx", ".pl", ".ie"]
)
LONG_TLDS = [".museum", ".photography", ".travel", ".technology", ".international", ".consulting", ".solutions"]
FREEMAIL: dict[str, list[str]] = {
    "en": words("gmail.com outlook.com hotmail.com yahoo.com icloud.com proton.me aol.com fastmail.com hey.com"),
    "de": ["gmx.de", "web.de", "t-online.de", "gmail.com", "posteo.de", "mailbox.org"],
    "fr": ["orange.fr", "free.fr", "laposte.net", "gmail.com", "sfr.fr"],
    "es": ["gmail.com", "hotmail.es", "yahoo.es", "telefonica.net"],
    "it": ["libero.it", "virgilio.it", "gmail.com", "tiscali.it"],
    "nl": ["ziggo.nl", "kpnmail.nl", "gmail.com", "hotmail.nl"],
    "pt": ["uol.com.br", "bol.com.br", "gmail.com", "sapo.pt"],
    "pl": ["wp.pl", "o2.pl", "interia.pl", "gmail.com", "onet.pl"],
    "nordic": ["gmail.com", "telia.com", "outlook.com", "online.no"],
    "in": ["gmail.com", "rediffmail.com", "yahoo.co.in", "outlook.com"],
    "ja": ["yahoo.co.jp", "gmail.com", "docomo.ne.jp", "icloud.com"],
    "zh": ["qq.com", "163.com", "126.com", "sina.com"],
    "ru": ["mail.ru", "yandex.ru", "gmail.com"],
}
ROLES = words(
    "support billing info sales hr careers noreply no-reply privacy security abuse postmaster accounts.payable "
    "ops-alerts it-helpdesk dpo team press invoices orders"
)
DOC_EMAILS = words(
    "user@example.com jane.doe@example.com john.smith@example.org alice@example.net bob+test@example.com "
    "admin@mail.example.com dev@myapp.test noreply@accounts.example first.last@sub.example.org "
    "test.user@example.com"
)
JOBS = bars("Account Manager|Senior Engineer|Office Manager|Head of Finance|Recruiter|Nurse Practitioner|CTO")
DEPTS = ["Finance", "Engineering", "Sales", "Operations", "People", "Legal", "Support", "Marketing"]
BANKS_DE = ["Commerzbank", "Deutsche Bank", "Sparkasse KölnBonn", "Volksbank Mittelhessen", "Postbank", "GLS Bank"]
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-latest", "claude-3-haiku-20240307", "o3-mini", "gemini-1.5-pro"]
SERVICES = ["billing-api", "auth", "checkout", "ledger", "search", "notifier", "gateway", "scheduler"]
PLUS_TAGS = ["news", "shopping", "bank", "work", "2024", "receipts", "travel", "github", "newsletter", "amazon"]
MONTHS = words("January February March April May June July August September October November December")
MON3 = [m[:3] for m in MONTHS]


def fold(s: str) -> str:
    """ASCII-fold a name part for an e-mail local part (keeps an apostrophe)."""
    s = s.replace("ß", "ss").replace("ł", "l").replace("Ł", "L").replace("ø", "o").replace("æ", "ae")
    s = unicodedata.normalize("NFKD", s)
    return "".join(c for c in s if c.isascii() and (c.isalpha() or c == "'"))


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    a_first: str
    a_last: str
    eastern: bool

    @property
    def full(self) -> str:
        if self.eastern:
            return f"{self.last}{self.first}" if not self.last.isascii() else f"{self.last} {self.first}"
        return f"{self.first} {self.last}"


def split_name(entry: str) -> tuple[str, str]:
    if "|" in entry:
        d, a = entry.split("|", 1)
        return d, a
    return entry, fold(entry)


def make_person(rng: random.Random, locale: str) -> Person:
    nl = NAME_LOCALE.get(locale, "en")
    f, af = split_name(rng.choice(FIRST[nl]))
    last, al = split_name(rng.choice(LAST[nl]))
    return Person(f, last, af, al, nl in ("ja", "zh"))


# -------------------------------------------------------------------------------------------- context


@dataclass
class Ctx:
    rng: random.Random
    locale: str
    fills: dict[tuple[str, str], str] = field(default_factory=dict)
    ents: dict[tuple[str, str], tuple[str, str, str]] = field(default_factory=dict)
    people: dict[str, Person] = field(default_factory=dict)

    def person(self, tag: str) -> Person:
        if tag not in self.people:
            p = make_person(self.rng, self.locale)
            while any(q.full == p.full for q in self.people.values()):
                p = make_person(self.rng, self.locale)
            self.people[tag] = p
        return self.people[tag]

    def fill(self, key: str, tag: str = "") -> str:
        k = (key, tag)
        if k not in self.fills:
            self.fills[k] = FILLERS[key](self, tag)
        return self.fills[k]


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def rand_str(rng: random.Random, alphabet: str, n: int, edge: str = ALNUM) -> str:
    """n characters from alphabet; first and last from edge (no token starts or ends with - or _)."""
    if n <= 2:
        return "".join(rng.choice(edge) for _ in range(n))
    mid = "".join(rng.choice(alphabet) for _ in range(n - 2))
    return rng.choice(edge) + mid + rng.choice(edge)


# ---------------------------------------------------------------------------------------------- e-mail


def local_part(rng: random.Random, p: Person) -> str:
    f, last = p.a_first.lower(), p.a_last.lower()
    if "'" in last and rng.random() < 0.6:
        last = last.replace("'", "")
    f = f.replace("'", "")
    styles = [
        f"{f}.{last}",
        f"{f[0]}{last}",
        f"{f}{last}",
        f"{f}_{last}",
        f"{last}.{f}",
        f"{f}{rng.randint(1, 99)}",
        f"{f}.{last}{rng.randint(70, 99)}",
        f"{f}-{last}",
        f"{f[0]}.{last}",
        f"{last}{f[0]}",
    ]
    return rng.choice(styles)


def company_domain(ctx: Ctx, tag: str) -> str:
    rng = ctx.rng
    name = ctx.fill("company", tag)
    words = [fold(w).lower() for w in name.replace("&", " ").split()]
    words = [w.replace("'", "") for w in words if w and w not in ("gmbh", "llp", "llc")]
    slug = rng.choice([words[0], "".join(words[:2]), "-".join(words[:2])])
    tld = rng.choice(TLDS)
    if "museum" in slug:
        tld = ".museum"
    return slug + tld


def em_personal(ctx: Ctx, tag: str) -> str:
    p = ctx.person(tag)
    loc = local_part(ctx.rng, p)
    if ctx.rng.random() < 0.2:
        loc += "+" + ctx.rng.choice(PLUS_TAGS)
    return f"{loc}@{ctx.rng.choice(FREEMAIL[NAME_LOCALE.get(ctx.locale, 'en')])}"


def em_corp(ctx: Ctx, tag: str) -> str:
    p = ctx.person(tag)
    dom = ctx.fill("domain")
    if ctx.rng.random() < 0.2:
        dom = ctx.rng.choice(["eu.", "us.", "mail.", "corp.", "de."]) + dom
    f, last = p.a_first.lower().replace("'", ""), p.a_last.lower().replace("'", "")
    loc = ctx.rng.choice([f"{f}.{last}", f"{f[0]}.{last}", f"{f[0]}{last}", f, f"{f}.{last}"])
    return f"{loc}@{dom}"


def em_person(ctx: Ctx, tag: str) -> str:
    return em_personal(ctx, tag) if ctx.rng.random() < 0.5 else em_corp(ctx, tag)


def em_role(ctx: Ctx, tag: str) -> str:
    dom = ctx.fill("domain")
    if ctx.rng.random() < 0.15:
        dom = ctx.rng.choice(["support.", "help.", "mail."]) + dom
    return f"{ctx.rng.choice(ROLES)}@{dom}"


def em_upper(ctx: Ctx, tag: str) -> str:
    e = em_person(ctx, tag)
    if ctx.rng.random() < 0.6:
        return e.upper()
    loc, dom = e.split("@")
    return ".".join(w.capitalize() for w in loc.split(".")) + "@" + dom.capitalize()


def em_doc(ctx: Ctx, tag: str) -> str:
    return ctx.rng.choice(DOC_EMAILS)


def em_simple(ctx: Ctx, tag: str) -> str:
    p = ctx.person(tag)
    return f"{local_part(ctx.rng, p)}@{ctx.rng.choice(FREEMAIL[NAME_LOCALE.get(ctx.locale, 'en')])}"


def em_lower(ctx: Ctx, tag: str) -> str:
    return em_simple(ctx, tag).lower()


def em_qq(ctx: Ctx, tag: str) -> str:
    return f"{ctx.rng.randint(1, 9)}{digits(ctx.rng, ctx.rng.randint(5, 9))}@{ctx.rng.choice(['qq.com', '163.com'])}"


def em_sub(ctx: Ctx, tag: str) -> str:
    p = ctx.person(tag)
    sub = ctx.rng.choice(["cs", "mail", "eng", "research", "alumni", "students", "med"])
    base = ctx.rng.choice(["univ-nord.edu", "kingsbridge.ac.uk", "tu-rheinland.de", "uni-example.ac.at"])
    return f"{local_part(ctx.rng, p)}@{sub}.{base}"


def em_longtld(ctx: Ctx, tag: str) -> str:
    p = ctx.person(tag)
    base = ctx.rng.choice(["harbour", "fernweh", "lightbox", "quarryhill", "atelier-nord", "bluepeak"])
    return f"{local_part(ctx.rng, p)}@{base}{ctx.rng.choice(LONG_TLDS)}"


def em_gsa(ctx: Ctx, tag: str) -> str:
    svc = ctx.rng.choice(["deployer", "ci-runner", "vertex-client", "etl", "backup"])
    return f"{svc}@{ctx.fill('proj')}.iam.gserviceaccount.com"


def em_any(ctx: Ctx, tag: str) -> str:
    f = ctx.rng.choice([em_personal, em_corp, em_role, em_upper, em_doc, em_sub, em_longtld, em_personal, em_corp])
    return f(ctx, tag)


EMAIL_SLOTS: dict[str, Callable[[Ctx, str], str]] = {
    "person": em_person,
    "personal": em_personal,
    "corp": em_corp,
    "role": em_role,
    "upper": em_upper,
    "doc": em_doc,
    "simple": em_simple,
    "lower": em_lower,
    "qq": em_qq,
    "sub": em_sub,
    "longtld": em_longtld,
    "gsa": em_gsa,
    "any": em_any,
}


# ----------------------------------------------------------------------------------------------- phones

INTL_REGIONS = words(
    "US CA GB DE FR ES IT NL BE CH AT SE NO DK FI PL PT IE AU NZ IN JP KR CN HK SG BR MX AR ZA NG KE EG AE SA "
    "IL TR UA CZ GR RO HU PH ID TH VN MY CL CO PE"
)
PT_MOBILE = PhoneNumberType.MOBILE
PT_FIXED = PhoneNumberType.FIXED_LINE
PT_TOLL = PhoneNumberType.TOLL_FREE


def rand_phone(rng: random.Random, region: str, ptype: int) -> PhoneNumber:
    ex = phonenumbers.example_number_for_type(region, ptype)
    if ex is None:
        raise ValueError(f"no example number for {region} {ptype}")
    nsn = phonenumbers.national_significant_number(ex)
    cc = ex.country_code
    ok_types = {ptype, PhoneNumberType.FIXED_LINE_OR_MOBILE}
    for attempt in range(5000):
        # mostly redraw everything after the first digit or two (varied area codes), else a longer prefix
        keep = rng.choice([0, 1, 1, 2]) if attempt < 3000 else rng.randint(1, max(1, len(nsn) - 4))
        cand = nsn[:keep] + digits(rng, len(nsn) - keep)
        num = phonenumbers.parse(f"+{cc}{cand}")
        if phonenumbers.is_valid_number_for_region(num, region) and phonenumbers.number_type(num) in ok_types:
            return num
    raise ValueError(f"could not draw a {region} number")


def fmt(num: PhoneNumber, style: str) -> str:
    intl = phonenumbers.format_number(num, PhoneNumberFormat.INTERNATIONAL)
    e164 = phonenumbers.format_number(num, PhoneNumberFormat.E164)
    nat = phonenumbers.format_number(num, PhoneNumberFormat.NATIONAL)
    if style == "e164":
        return e164
    if style == "intl":
        return intl
    if style == "intl_dash":
        return intl.replace(" ", "-")
    if style == "intl_dot":
        return re.sub(r"[ -]", ".", intl)
    if style == "00":
        return "00" + intl[1:]
    if style == "00c":
        return "00" + e164[1:]
    if style == "trunk":
        cc, rest = intl.split(" ", 1)
        return f"{cc} (0){rest}"
    if style == "nat":
        return nat
    if style == "nat_dots":
        return re.sub(r"[ -]+", ".", nat.replace("(", "").replace(")", ""))
    if style == "nat_slash":  # German habit: 030/1234567 (trunk 0, area code, slash, subscriber number)
        nsn = phonenumbers.national_significant_number(num)
        area = phonenumbers.length_of_geographical_area_code(num)
        return f"0{nsn[:area]}/{nsn[area:]}" if area else nat
    raise ValueError(style)


def us_number(rng: random.Random) -> PhoneNumber:
    return rand_phone(rng, "US", rng.choice([PT_FIXED, PT_MOBILE]))


def us_style(num: PhoneNumber, style: str) -> str:
    d = phonenumbers.national_significant_number(num)
    a, b, c = d[:3], d[3:6], d[6:]
    table = {
        "us_nat": f"({a}) {b}-{c}",
        "us_dash": f"{a}-{b}-{c}",
        "us_dots": f"{a}.{b}.{c}",
        "us_1": f"1-{a}-{b}-{c}",
        "us_1p": f"1 ({a}) {b}-{c}",
        "us_intl": f"+1 {a}-{b}-{c}",
        "us_intl_p": f"+1 ({a}) {b}-{c}",
        "us_intl_sp": f"+1 {a} {b} {c}",
        "us_intl_dash": f"+1-{a}-{b}-{c}",
        "us_intl_dot": f"+1.{a}.{b}.{c}",
        "us_e164": f"+1{d}",
        "us_rfc3966": f"+1-{a}-{b}-{c}",
    }
    return table[style]


US_INTL_STYLES = ["us_intl", "us_intl_p", "us_intl_sp", "us_intl_dash", "us_intl_dot"]
US_NAT_STYLES = ["us_nat", "us_dash", "us_dots", "us_1", "us_1p"]
DOC_NPAS = ["212", "310", "312", "415", "617", "206", "305", "512", "303", "404", "702", "646"]


def ph_intl(ctx: Ctx, tag: str) -> tuple[str, str]:
    rng = ctx.rng
    region = rng.choice(INTL_REGIONS)
    num = rand_phone(rng, region, rng.choice([PT_MOBILE, PT_FIXED]))
    style = rng.choice(["intl", "intl", "intl", "e164", "intl_dash", "00", "intl_dot"])
    return fmt(num, style), region


def ph_e164(ctx: Ctx, tag: str) -> tuple[str, str]:
    region = ctx.rng.choice(INTL_REGIONS)
    return fmt(rand_phone(ctx.rng, region, ctx.rng.choice([PT_MOBILE, PT_FIXED])), "e164"), region


def ph_00(ctx: Ctx, tag: str) -> tuple[str, str]:
    region = ctx.rng.choice([r for r in INTL_REGIONS if r not in ("US", "CA")])
    num = rand_phone(ctx.rng, region, ctx.rng.choice([PT_MOBILE, PT_FIXED]))
    return fmt(num, ctx.rng.choice(["00", "00", "00c"])), region


def ph_us(style: str) -> Callable[[Ctx, str], tuple[str, str]]:
    def f(ctx: Ctx, tag: str) -> tuple[str, str]:
        s = style
        if s == "us_any":
            s = ctx.rng.choice([*US_NAT_STYLES, *US_INTL_STYLES, "us_e164"])
        elif s == "us_intl":
            s = ctx.rng.choice(US_INTL_STYLES)
        return us_style(us_number(ctx.rng), s), "US"

    return f


def ph_us_doc(ctx: Ctx, tag: str) -> tuple[str, str]:
    num = phonenumbers.parse(f"+1{ctx.rng.choice(DOC_NPAS)}55501{ctx.rng.randint(0, 99):02d}")
    return us_style(num, ctx.rng.choice([*US_NAT_STYLES, *US_INTL_STYLES, "us_e164"])), "US"


def ph_us_tf(ctx: Ctx, tag: str) -> tuple[str, str]:
    num = rand_phone(ctx.rng, "US", PT_TOLL)
    return us_style(num, ctx.rng.choice(["us_1", "us_nat", "us_1p", "us_intl_sp", "us_dash", "us_intl"])), "US"


def ph_region(region: str, ptype: int, styles: list[str]) -> Callable[[Ctx, str], tuple[str, str]]:
    def f(ctx: Ctx, tag: str) -> tuple[str, str]:
        return fmt(rand_phone(ctx.rng, region, ptype), ctx.rng.choice(styles)), region

    return f


NAT_REGIONS = words("GB DE FR ES IT NL BE CH AT SE NO DK FI PL PT IE AU NZ IN JP BR MX ZA SG CA")
PHONE_SLOTS: dict[str, Callable[[Ctx, str], tuple[str, str]]] = {
    "intl": ph_intl,
    "e164": ph_e164,
    "00": ph_00,
    "us_any": ph_us("us_any"),
    "us_intl": ph_us("us_intl"),
    "us_e164": ph_us("us_e164"),
    "us_nat": ph_us("us_nat"),
    "us_dash": ph_us("us_dash"),
    "us_dots": ph_us("us_dots"),
    "us_rfc3966": ph_us("us_rfc3966"),
    "us_doc": ph_us_doc,
    "us_tf": ph_us_tf,
    "gb_trunk": ph_region("GB", PT_FIXED, ["trunk"]),
    "de_trunk": ph_region("DE", PT_FIXED, ["trunk"]),
    "de_slash": ph_region("DE", PT_FIXED, ["nat_slash"]),
    "fr_dots": ph_region("FR", PT_FIXED, ["nat_dots"]),
    "gb_tf_nat": ph_region("GB", PT_TOLL, ["nat"]),
    "au_tf_nat": ph_region("AU", PT_TOLL, ["nat"]),
    "de_tf_nat": ph_region("DE", PT_TOLL, ["nat"]),
}
for _r in NAT_REGIONS:
    _lr = _r.lower()
    PHONE_SLOTS[f"{_lr}_nat"] = ph_region(_r, PT_FIXED, ["nat"])
    PHONE_SLOTS[f"{_lr}_mob_nat"] = ph_region(_r, PT_MOBILE, ["nat"])
    PHONE_SLOTS[f"{_lr}_intl"] = ph_region(_r, PT_MOBILE, ["intl", "e164", "00"])


# ------------------------------------------------------------------------------------------------ cards


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_complete(partial: str) -> str:
    for d in string.digits:
        if luhn_ok(partial + d):
            return partial + d
    raise AssertionError


def _rng_prefixes(lo: int, hi: int) -> list[str]:
    return [str(x) for x in range(lo, hi + 1)]


BRANDS: dict[str, tuple[list[str], list[int]]] = {
    "visa": (["4"], [16, 16, 16, 16, 13, 19]),
    "mc": (["51", "52", "53", "54", "55", *_rng_prefixes(2221, 2720)], [16]),
    "amex": (["34", "37"], [15]),
    "discover": (["6011", "65", *_rng_prefixes(644, 649)], [16, 16, 19]),
    "diners": (["36", "38", *_rng_prefixes(300, 305)], [14]),
    "jcb": (_rng_prefixes(3528, 3589), [16, 16, 19]),
    "unionpay": (["62"], [16, 16, 19]),
    "maestro": (["6759", "6761", "6763", "5018", "5020", "5038"], [16, 19]),
    "mir": (_rng_prefixes(2200, 2204), [16]),
}
DOC_CARDS = words(
    "4111111111111111 4242424242424242 4012888888881881 5555555555554444 5105105105105100 2223003122003222 "
    "378282246310005 371449635398431 6011111111111117 6011000990139424 3056930009020004 36227206271667 "
    "3566002020360505 6200000000000005"
)


def card_brand(number: str) -> str | None:
    """The brand whose prefix and length fit (the check's independent view of BRANDS)."""
    n = len(number)
    if number.startswith("4") and n in (13, 16, 19):
        return "visa"
    if n == 16 and (51 <= int(number[:2]) <= 55 or 2221 <= int(number[:4]) <= 2720):
        return "mc"
    if n == 15 and number[:2] in ("34", "37"):
        return "amex"
    if n in (16, 19) and (number.startswith(("6011", "65")) or 644 <= int(number[:3]) <= 649):
        return "discover"
    if n in (14, 16) and (number[:2] in ("36", "38") or 300 <= int(number[:3]) <= 305):
        return "diners"
    if n in (16, 19) and 3528 <= int(number[:4]) <= 3589:
        return "jcb"
    if n in (16, 19) and number.startswith("62"):
        return "unionpay"
    if n in (16, 19) and number[:4] in ("6759", "6761", "6763", "5018", "5020", "5038"):
        return "maestro"
    if n == 16 and 2200 <= int(number[:4]) <= 2204:
        return "mir"
    return None


def make_card(rng: random.Random, brand: str) -> str:
    prefixes, lengths = BRANDS[brand]
    prefix = rng.choice(prefixes)
    length = rng.choice(lengths)
    return luhn_complete(prefix + digits(rng, length - len(prefix) - 1))


def group_card(number: str, sep: str) -> str:
    n = len(number)
    if n == 15:
        sizes = [4, 6, 5]
    elif n == 14:
        sizes = [4, 6, 4]
    elif n == 13:
        sizes = [4, 4, 5]
    elif n == 19:
        sizes = [4, 4, 4, 4, 3]
    else:
        sizes = [4, 4, 4, 4]
    out, i = [], 0
    for s in sizes:
        out.append(number[i : i + s])
        i += s
    return sep.join(out)


def card_slot(brand: str, style: str) -> Callable[[Ctx, str], tuple[str, str]]:
    def f(ctx: Ctx, tag: str) -> tuple[str, str]:
        rng = ctx.rng
        b = rng.choice(list(BRANDS)) if brand == "any" else brand
        if brand == "any" and rng.random() < 0.35:
            b = "visa"
        num = rng.choice(DOC_CARDS) if brand == "doc" else make_card(rng, b)
        s = rng.choice(["compact", "spaced", "spaced", "dashed"]) if style == "any" else style
        if len(num) == 13 and s != "compact":
            s = "compact"
        value = num if s == "compact" else group_card(num, " " if s == "spaced" else "-")
        return value, card_brand(num) or "?"

    return f


CARD_SLOTS: dict[str, Callable[[Ctx, str], tuple[str, str]]] = {
    "any": card_slot("any", "any"),
    "compact": card_slot("any", "compact"),
    "spaced": card_slot("any", "spaced"),
    "dashed": card_slot("any", "dashed"),
    "doc": card_slot("doc", "any"),
}
for _b in BRANDS:
    CARD_SLOTS[_b] = card_slot(_b, "any")


# ------------------------------------------------------------------------------------------------ IBANs

# BBAN layouts from the SWIFT IBAN registry: n digits, a upper-case letters, c alphanumerics.
IBAN_SPECS: dict[str, str] = {
    "AD": "4n4n12c",
    "AE": "3n16n",
    "AT": "5n11n",
    "BE": "3n7n2n",
    "BG": "4a4n2n8c",
    "BH": "4a14c",
    "BR": "8n5n10n1a1c",
    "CH": "5n12c",
    "CY": "3n5n16c",
    "CZ": "4n16n",
    "DE": "8n10n",
    "DK": "4n9n1n",
    "EE": "2n14n",
    "ES": "4n4n1n1n10n",
    "FI": "3n11n",
    "FR": "5n5n11c2n",
    "GB": "4a6n8n",
    "GR": "3n4n16c",
    "HR": "7n10n",
    "HU": "3n4n1n15n1n",
    "IE": "4a6n8n",
    "IL": "3n3n13n",
    "IS": "4n2n6n10n",
    "IT": "1a5n5n12c",
    "KW": "4a22c",
    "LI": "5n12c",
    "LT": "5n11n",
    "LU": "3n13c",
    "LV": "4a13c",
    "MC": "5n5n11c2n",
    "MT": "4a5n18c",
    "NL": "4a10n",
    "NO": "4n6n1n",
    "PL": "8n16n",
    "PT": "4n4n11n2n",
    "QA": "4a21c",
    "RO": "4a16c",
    "SA": "2n18c",
    "SE": "3n16n1n",
    "SI": "5n8n2n",
    "SK": "4n6n10n",
    "TR": "5n1n16c",
    "UA": "6n19c",
}
BANK_CODES = {
    "GB": ["NWBK", "BARC", "HBUK", "LOYD", "MIDL", "MONZ", "REVO"],
    "IE": ["AIBK", "BOFI", "IPBS"],
    "NL": ["ABNA", "INGB", "RABO", "TRIO", "SNSB", "ASNB", "KNAB", "BUNQ"],
    "BG": ["BNBG", "UNCR", "STSA"],
    "RO": ["BTRL", "RNCB", "BRDE", "INGB"],
    "LV": ["HABA", "UNLA", "PARX"],
    "MT": ["MALT", "VALL", "APSB"],
    "KW": ["NBOK", "CBKU", "GULB"],
    "QA": ["QNBA", "DOHB", "CBQA"],
    "BH": ["NBOB", "BBKU", "AUBB"],
}
DOC_IBANS = bars(
    "GB82 WEST 1234 5698 7654 32|DE89 3704 0044 0532 0130 00|FR14 2004 1010 0505 0001 3M02 606|"
    "NL91 ABNA 0417 1643 00|GB33BUKB20201555555555|CH9300762011623852957|BE68539007547034"
)
EU_IBAN = words("DE FR ES IT NL BE AT PT IE FI LU GR SI SK LT LV EE MT CY HR BG RO PL CZ HU SE DK")
FAR_IBAN = ["AE", "SA", "QA", "KW", "BH", "IL", "TR", "BR", "UA", "IS", "NO", "CH", "LI", "MC", "AD", "GB"]


def iban_check(cc: str, bban: str) -> str:
    num = "".join(str(int(c, 36)) for c in bban + cc + "00")
    return f"{98 - int(num) % 97:02d}"


def mod97_ok(iban: str) -> bool:
    s = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


def make_iban(rng: random.Random, cc: str) -> str:
    spec = re.findall(r"(\d+)([nac])", IBAN_SPECS[cc])
    for _ in range(20000):
        parts: list[str] = []
        for i, (count, kind) in enumerate(spec):
            n = int(count)
            if kind == "n":
                parts.append(digits(rng, n))
            elif kind == "a":
                if i == 0 and cc in BANK_CODES and n == 4:
                    parts.append(rng.choice(BANK_CODES[cc]))
                else:
                    parts.append("".join(rng.choice(string.ascii_uppercase) for _ in range(n)))
            else:
                parts.append(
                    "".join(rng.choice(UPPER_ALNUM if rng.random() < 0.15 else string.digits) for _ in range(n))
                )
        bban = "".join(parts)
        iban = cc + iban_check(cc, bban) + bban
        if stdnum.iban.is_valid(iban):  # also the national check digits where python-stdnum knows them
            return iban
    raise ValueError(f"no valid IBAN for {cc}")


def group4(s: str) -> str:
    return " ".join(s[i : i + 4] for i in range(0, len(s), 4))


def iban_slot(countries: list[str] | None, style: str) -> Callable[[Ctx, str], tuple[str, str]]:
    def f(ctx: Ctx, tag: str) -> tuple[str, str]:
        rng = ctx.rng
        if countries is None:
            v = rng.choice(DOC_IBANS)
            if style == "compact":
                v = v.replace(" ", "")
            return v, v[:2]
        cc = rng.choice(countries)
        iban = make_iban(rng, cc)
        s = rng.choice(["compact", "grouped"]) if style == "any" else style
        return (iban if s == "compact" else group4(iban)), cc

    return f


IBAN_SLOTS: dict[str, Callable[[Ctx, str], tuple[str, str]]] = {
    "any": iban_slot(EU_IBAN + FAR_IBAN, "any"),
    "compact": iban_slot(EU_IBAN + FAR_IBAN, "compact"),
    "grouped": iban_slot(EU_IBAN + FAR_IBAN, "grouped"),
    "far": iban_slot(FAR_IBAN, "any"),
    "doc": iban_slot(None, "any"),
}
for _c in IBAN_SPECS:
    IBAN_SLOTS[_c] = iban_slot([_c], "any")
    IBAN_SLOTS[f"{_c}_grouped"] = iban_slot([_c], "grouped")


# ------------------------------------------------------------------------------------------------- SSNs


def ssn_ok(area: int, group: int, serial: int) -> bool:
    return 1 <= area <= 899 and area != 666 and 1 <= group <= 99 and 1 <= serial <= 9999


def make_ssn(rng: random.Random) -> tuple[int, int, int]:
    while True:
        a, g, s = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
        if ssn_ok(a, g, s):
            return a, g, s


def ssn_slot(style: str) -> Callable[[Ctx, str], tuple[str, str]]:
    def f(ctx: Ctx, tag: str) -> tuple[str, str]:
        a, g, s = make_ssn(ctx.rng)
        st = ctx.rng.choice(["dashed", "dashed", "spaced", "compact"]) if style == "any" else style
        sep = {"dashed": "-", "spaced": " ", "compact": ""}[st]
        return f"{a:03d}{sep}{g:02d}{sep}{s:04d}", st

    return f


SSN_SLOTS = {k: ssn_slot(k) for k in ("dashed", "spaced", "compact", "any")}


# -------------------------------------------------------------------------------------------------- IPs


def v4_public(rng: random.Random) -> str:
    while True:
        a = rng.randint(1, 223)
        b = rng.randint(0, 255)
        ip = ipaddress.IPv4Address(f"{a}.{b}.{rng.randint(0, 255)}.{rng.randint(1, 254)}")
        if ip.is_global:
            return str(ip)


def v4_private(rng: random.Random) -> str:
    kind = rng.choice(["10", "172", "192"])
    last = rng.randint(1, 254)
    if kind == "10":
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{last}"
    if kind == "172":
        return f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{last}"
    return f"192.168.{rng.randint(0, 255)}.{last}"


def v4_doc(rng: random.Random) -> str:
    return f"{rng.choice(['192.0.2', '198.51.100', '203.0.113'])}.{rng.randint(1, 254)}"


def v6_compress(groups: list[int]) -> str:
    return str(ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups)))


def v6_global(rng: random.Random) -> list[int]:
    first = rng.choice([0x2001, 0x2400, 0x2600, 0x2A00, 0x2A01, 0x2A02, 0x2604, 0x2003, 0x2C0F, 0x2406])
    groups = [first, rng.randint(0, 0xFFFF)]
    groups += [rng.randint(0, 0xFFFF) for _ in range(6)]
    zeros = rng.choice([0, 2, 3, 4])
    if zeros:
        start = rng.randint(2, 7 - zeros)  # the last group stays: host addresses seldom end in ::
        for i in range(start, start + zeros):
            groups[i] = 0
    if rng.random() < 0.3:
        groups[2] = rng.randint(0, 0xFF)
    return groups


ZONES = ["eth0", "en0", "wlan0", "ens192", "eno1", "enp0s31f6", "12", "3"]


def ip_value(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "any":
        kind = rng.choice(["public", "private", "doc", "comp", "full", "mapped", "link", "doc6", "global"])
    if kind == "public":
        return v4_public(rng), "v4"
    if kind == "private":
        return v4_private(rng), "v4"
    if kind == "doc":
        return v4_doc(rng), "v4"
    if kind == "v4":
        return rng.choice([v4_public, v4_private, v4_doc])(rng), "v4"
    if kind == "loop":
        return rng.choice(["127.0.0.1", "127.0.0.1", "127.0.1.1"]), "v4"
    if kind in ("global", "comp"):
        return v6_compress(v6_global(rng)), "v6"
    if kind == "full":
        return ipaddress.IPv6Address(v6_compress(v6_global(rng))).exploded, "v6"
    if kind == "upper":
        return v6_compress(v6_global(rng)).upper(), "v6"
    if kind == "doc6":
        g = [0x2001, 0xDB8] + [rng.choice([0, 0, rng.randint(0, 0xFFFF)]) for _ in range(6)]
        return v6_compress(g), "v6"
    if kind == "ula":
        g = [0xFD00 | rng.randint(0, 0xFF)] + [rng.randint(0, 0xFFFF) for _ in range(3)] + [0, 0, 0, rng.randint(1, 99)]
        return v6_compress(g), "v6"
    if kind == "mapped":
        return f"::ffff:{rng.choice([v4_public, v4_private, v4_doc])(rng)}", "v6"
    if kind == "nat64":
        return f"64:ff9b::{v4_public(rng)}", "v6"
    if kind == "link":
        g = [0xFE80, 0, 0, 0] + [rng.randint(0, 0xFFFF) for _ in range(4)]
        return f"{v6_compress(g)}%{rng.choice(ZONES)}", "v6"
    if kind == "loop6":
        return "::1", "v6"
    raise ValueError(kind)


def ip_slot(kind: str) -> Callable[[Ctx, str], tuple[str, str]]:
    def f(ctx: Ctx, tag: str) -> tuple[str, str]:
        return ip_value(kind, ctx.rng)

    return f


IP_SLOTS: dict[str, Callable[[Ctx, str], tuple[str, str]]] = {
    "V4": ip_slot("v4"),
    "PUB": ip_slot("public"),
    "PRIV": ip_slot("private"),
    "DOC": ip_slot("doc"),
    "LOOP": ip_slot("loop"),
    "V6": ip_slot("global"),
    "FULL6": ip_slot("full"),
    "UPPER6": ip_slot("upper"),
    "DOC6": ip_slot("doc6"),
    "ULA6": ip_slot("ula"),
    "MAPPED6": ip_slot("mapped"),
    "NAT64": ip_slot("nat64"),
    "LINK6": ip_slot("link"),
    "LOOP6": ip_slot("loop6"),
    "ANY": ip_slot("any"),
}


# ---------------------------------------------------------------------------------------------- secrets


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def sk_openai_legacy(rng: random.Random) -> str:
    return "sk-" + rand_str(rng, ALNUM, 20) + "T3BlbkFJ" + rand_str(rng, ALNUM, 20)


def sk_openai_proj(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return "sk-proj-" + rand_str(rng, ALNUM, 48)
    return "sk-proj-" + rand_str(rng, URLSAFE, 74) + "T3BlbkFJ" + rand_str(rng, URLSAFE, 74)


def sk_openai(rng: random.Random) -> str:
    return sk_openai_proj(rng) if rng.random() < 0.7 else sk_openai_legacy(rng)


def sk_anthropic(rng: random.Random) -> str:
    return "sk-ant-api03-" + rand_str(rng, URLSAFE, 93) + "AA"


def aws_key(rng: random.Random) -> str:
    return rng.choice(["AKIA", "AKIA", "AKIA", "ASIA"]) + "".join(
        rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)
    )


def gh_token(rng: random.Random, prefix: str = "") -> str:
    return (prefix or rng.choice(["ghp_", "ghp_", "gho_", "ghs_", "ghu_", "ghr_"])) + rand_str(rng, ALNUM, 36)


def gh_pat(rng: random.Random) -> str:
    return "github_pat_11" + rand_str(rng, UPPER_ALNUM, 20) + "_" + rand_str(rng, ALNUM, 59)


def slack_bot(rng: random.Random) -> str:
    return f"xoxb-{digits(rng, rng.choice([10, 11, 12, 13]))}-{digits(rng, 13)}-{rand_str(rng, ALNUM, 24)}"


def slack_user(rng: random.Random) -> str:
    parts = [digits(rng, rng.choice([11, 12])), digits(rng, rng.choice([11, 12])), digits(rng, 13)]
    return "xoxp-" + "-".join(parts) + "-" + "".join(rng.choice(HEX) for _ in range(32))


def jwt(rng: random.Random) -> str:
    alg = rng.choice(["HS256", "RS256", "ES256", "HS512", "RS256"])
    header: dict[str, str] = {"alg": alg, "typ": "JWT"}
    if alg.startswith(("RS", "ES")) and rng.random() < 0.6:
        header["kid"] = "".join(rng.choice(HEX) for _ in range(16))
    iat = 1_700_000_000 + rng.randint(0, 40_000_000)
    payload: dict[str, object] = {
        "sub": rng.choice([str(rng.randint(1000, 999999)), f"user_{rand_str(rng, ALNUM, 12)}"]),
        "iat": iat,
        "exp": iat + rng.choice([900, 3600, 86400]),
    }
    if rng.random() < 0.5:
        payload["iss"] = rng.choice(["https://auth.acme-corp.io/", "https://login.nimbus.dev", "accounts"])
    if rng.random() < 0.4:
        payload["scope"] = rng.choice(["read:orders write:orders", "openid profile", "admin"])
    if rng.random() < 0.3:
        payload["role"] = rng.choice(["authenticated", "service_role", "viewer"])
    sig_len = {"HS256": 32, "HS512": 64, "RS256": 256, "ES256": 64}[alg]
    h = b64u(json.dumps(header, separators=(",", ":")).encode())
    p = b64u(json.dumps(payload, separators=(",", ":")).encode())
    return f"{h}.{p}.{b64u(rng.randbytes(sig_len))}"


PEM_KINDS: dict[str, tuple[bytes, int, int]] = {
    "RSA PRIVATE KEY": (bytes.fromhex("308204a40201000282010100"), 1192, 64),
    "PRIVATE KEY": (bytes.fromhex("308204be020100300d06092a864886f70d0101010500048204a8"), 1218, 64),
    "EC PRIVATE KEY": (bytes.fromhex("307702010104"), 121, 64),
    "OPENSSH PRIVATE KEY": (b"openssh-key-v1\x00\x00\x00\x00\x04none\x00\x00\x00\x04none", 399, 70),
    "ENCRYPTED PRIVATE KEY": (bytes.fromhex("3082051e304006092a864886f70d01050d"), 1314, 64),
}


def pem_lines(rng: random.Random, kind: str) -> list[str]:
    prefix, size, width = PEM_KINDS[kind]
    body = base64.b64encode(prefix + rng.randbytes(size - len(prefix))).decode()
    return [
        f"-----BEGIN {kind}-----",
        *(body[i : i + width] for i in range(0, len(body), width)),
        f"-----END {kind}-----",
    ]


def pem_kind(rng: random.Random) -> str:
    return rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])


def bearer_opaque(rng: random.Random) -> str:
    style = rng.randint(0, 6)
    if style == 0:
        return rand_str(rng, URLSAFE, rng.randint(32, 64))
    if style == 1:
        return "ya29.a0" + rand_str(rng, URLSAFE, rng.randint(110, 160))
    if style == 2:
        return "".join(rng.choice(HEX) for _ in range(rng.choice([40, 64])))
    if style == 3:
        return "hf_" + rand_str(rng, ALNUM, 34)
    if style == 4:
        return base64.b64encode(rng.randbytes(rng.choice([30, 32, 48]))).decode()
    if style == 5:
        return "glpat-" + rand_str(rng, URLSAFE, 20)
    return rand_str(rng, ALNUM, 8) + "." + rand_str(rng, URLSAFE, 43)


def secret_value(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "any":
        kind = rng.choice(["openai", "anthropic", "aws", "gh", "gh_pat", "slack", "jwt", "openai"])
    if kind == "any_api":
        kind = rng.choice(["openai", "anthropic", "jwt", "bearer", "bearer", "gh", "slack_bot"])
    table: dict[str, tuple[Callable[[random.Random], str], str]] = {
        "openai": (sk_openai, "openai"),
        "openai_proj": (sk_openai_proj, "openai"),
        "openai_legacy": (sk_openai_legacy, "openai"),
        "anthropic": (sk_anthropic, "anthropic"),
        "aws": (aws_key, "aws"),
        "gh": (gh_token, "github"),
        "ghs": (lambda r: gh_token(r, "ghs_"), "github"),
        "gh_pat": (gh_pat, "github"),
        "slack_bot": (slack_bot, "slack"),
        "slack_user": (slack_user, "slack"),
        "slack": (lambda r: slack_bot(r) if r.random() < 0.6 else slack_user(r), "slack"),
        "jwt": (jwt, "jwt"),
        "bearer": (bearer_opaque, "bearer"),
    }
    if kind in table:
        fn, meta = table[kind]
        return fn(rng), meta
    if kind.startswith("pem"):
        lines = pem_lines(rng, pem_kind(rng))
        if kind == "pem":
            return "\n".join(lines), "pem"
        if kind == "pem_json":
            return "\\n".join(lines), "pem"
        if kind.startswith("pem_i"):
            return ("\n" + " " * int(kind[5:])).join(lines), "pem"
        if kind == "pem_crlf":
            return "\r\n".join(lines), "pem"
    raise ValueError(kind)


def secret_slot(kind: str) -> Callable[[Ctx, str], tuple[str, str]]:
    def f(ctx: Ctx, tag: str) -> tuple[str, str]:
        return secret_value(kind, ctx.rng)

    return f


SECRET_KINDS = words(
    "any any_api openai openai_proj openai_legacy anthropic aws gh ghs gh_pat slack_bot slack_user slack jwt "
    "bearer pem pem_json pem_i4 pem_i6 pem_crlf"
)
SECRET_SLOTS = {k: secret_slot(k) for k in SECRET_KINDS}

# slot family -> (entity type, slots); a slot returns (value, meta)
ENTITY_FAMILIES: dict[str, tuple[str, dict[str, Callable[[Ctx, str], tuple[str, str]]]]] = {
    "PHONE": ("PHONE", PHONE_SLOTS),
    "CARD": ("CREDIT_CARD", CARD_SLOTS),
    "IBAN": ("IBAN", IBAN_SLOTS),
    "SSN": ("US_SSN", SSN_SLOTS),
    "IP": ("IP_ADDRESS", IP_SLOTS),
    "SECRET": ("SECRET", SECRET_SLOTS),
}


def entity(ctx: Ctx, family: str, name: str, tag: str) -> tuple[str, str, str]:
    key = (f"{family}.{name}", tag)
    if tag and key in ctx.ents:
        return ctx.ents[key]
    if family == "EMAIL":
        out = ("EMAIL", EMAIL_SLOTS[name](ctx, tag), name)
    else:
        typ, slots = ENTITY_FAMILIES[family]
        value, meta = slots[name](ctx, tag)
        out = (typ, value, meta)
    if tag:
        ctx.ents[key] = out
    return out


# ---------------------------------------------------------------------------------------------- fillers


def _date(ctx: Ctx) -> tuple[int, int, int]:
    r = ctx.rng
    return r.randint(2019, 2025), r.randint(1, 12), r.randint(1, 28)


def f_date(ctx: Ctx, tag: str) -> str:
    y, m, d = _date(ctx)
    loc = ctx.locale
    if loc in ("de", "pl", "ru", "fi", "nb", "da"):
        return f"{d:02d}.{m:02d}.{y}"
    if loc in ("fr", "es", "it", "pt", "nl"):
        return f"{d:02d}/{m:02d}/{y}"
    if loc in ("ja", "zh"):
        return f"{y}年{m}月{d}日"
    return ctx.rng.choice([f"{MONTHS[m - 1]} {d}, {y}", f"{d} {MONTHS[m - 1]} {y}", f"{y}-{m:02d}-{d:02d}"])


def f_ts(ctx: Ctx, tag: str) -> str:
    y, m, d = _date(ctx)
    r = ctx.rng
    hms = f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"
    return f"{y}-{m:02d}-{d:02d}T{hms}.{r.randint(0, 999):03d}Z"


def f_ts_log(ctx: Ctx, tag: str) -> str:
    y, m, d = _date(ctx)
    r = ctx.rng
    hms = f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"
    return f"{y}-{m:02d}-{d:02d} {hms},{r.randint(0, 999):03d}"


def f_ts_nginx(ctx: Ctx, tag: str) -> str:
    y, m, d = _date(ctx)
    r = ctx.rng
    return f"{d:02d}/{MON3[m - 1]}/{y}:{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d} +0000"


def f_ts_syslog(ctx: Ctx, tag: str) -> str:
    _, m, d = _date(ctx)
    r = ctx.rng
    return f"{MON3[m - 1]} {d:2d} {r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"


def f_git_date(ctx: Ctx, tag: str) -> str:
    y, m, d = _date(ctx)
    r = ctx.rng
    wd = ["Mon", "Tue", "Wed", "Thu", "Fri"][r.randint(0, 4)]
    hms = f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"
    return f"{wd} {MON3[m - 1]} {d} {hms} {y} {r.choice(['+0200', '-0700', '+0000', '+0530'])}"


def f_street(ctx: Ctx, tag: str) -> str:
    r = ctx.rng
    n = r.randint(1, 2400)
    loc = ctx.locale
    if loc == "de":
        return f"{r.choice(STREET_DE)}straße {r.randint(1, 120)}"
    if loc == "fr":
        return f"{r.randint(1, 90)} rue {r.choice(STREET_FR)}"
    if loc == "es":
        return f"Calle {r.choice(STREET_ES)} {r.randint(1, 90)}"
    if loc == "it":
        return f"Via {r.choice(STREET_IT)} {r.randint(1, 90)}"
    if loc == "nl":
        return f"{r.choice(STREET_NL)}straat {r.randint(1, 90)}"
    if loc == "pt":
        return f"Rua {r.choice(STREET_PT)}, {r.randint(1, 900)}"
    return f"{n} {r.choice(STREET_NAMES)} {r.choice(['Street', 'Avenue', 'Road', 'Drive', 'Lane', 'Blvd'])}"


def f_us_place(ctx: Ctx, tag: str) -> str:
    city, st, z = ctx.rng.choice(US_PLACES)
    return f"{city}, {st} {z}{ctx.rng.randint(1, 99):02d}"


def f_amount(ctx: Ctx, tag: str) -> str:
    v = ctx.rng.randint(500, 950000)
    return f"{v // 100:,}.{v % 100:02d}"


def f_eur(ctx: Ctx, tag: str) -> str:
    v = ctx.rng.randint(500, 950000)
    return f"{v // 100:,}".replace(",", ".") + f",{v % 100:02d}"


def f_uuid(ctx: Ctx, tag: str) -> str:
    h = "".join(ctx.rng.choice(HEX) for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{ctx.rng.choice('89ab')}{h[17:20]}-{h[20:]}"


def hexn(n: int) -> Callable[[Ctx, str], str]:
    return lambda ctx, tag: "".join(ctx.rng.choice(HEX) for _ in range(n))


def numn(lo: int, hi: int) -> Callable[[Ctx, str], str]:
    return lambda ctx, tag: str(ctx.rng.randint(lo, hi))


def pick(options: list[str]) -> Callable[[Ctx, str], str]:
    return lambda ctx, tag: ctx.rng.choice(options)


def f_masked_card(ctx: Ctx, tag: str) -> str:
    last4 = digits(ctx.rng, 4)
    return ctx.rng.choice(
        [f"************{last4}", f"**** **** **** {last4}", f"XXXX-XXXX-XXXX-{last4}", f"•••• {last4}"]
    )


def f_bic(ctx: Ctx, tag: str) -> str:
    r = ctx.rng
    bank = "".join(r.choice(string.ascii_uppercase) for _ in range(4))
    cc = r.choice(["DE", "FR", "ES", "IT", "NL", "BE", "AT", "GB", "CH", "SE"])
    loc = r.choice(["FF", "MM", "2X", "22", "PP", "AA"])
    return bank + cc + loc + r.choice(["", "", "XXX"])


FILLERS: dict[str, Callable[[Ctx, str], str]] = {
    "name": lambda ctx, tag: ctx.person(tag).full,
    "NAME": lambda ctx, tag: ctx.person(tag).full.upper(),
    "first": lambda ctx, tag: ctx.person(tag).first,
    "last": lambda ctx, tag: ctx.person(tag).last,
    "afirst": lambda ctx, tag: ctx.person(tag).a_first.replace("'", ""),
    "initial": lambda ctx, tag: ctx.rng.choice(string.ascii_uppercase),
    "company": lambda ctx, tag: ctx.rng.choice(COMPANIES),
    "domain": company_domain,
    "city": lambda ctx, tag: ctx.rng.choice(CITIES.get(ctx.locale, CITIES["en"])),
    "street": f_street,
    "us_place": f_us_place,
    "zip5": lambda ctx, tag: f"{ctx.rng.randint(1001, 99950):05d}",
    "date": f_date,
    "date_iso": lambda ctx, tag: "{}-{:02d}-{:02d}".format(*_date(ctx)),
    "dob": lambda ctx, tag: f"{ctx.rng.randint(1, 12):02d}/{ctx.rng.randint(1, 28):02d}/{ctx.rng.randint(1940, 2004)}",
    "ts": f_ts,
    "ts_log": f_ts_log,
    "ts_nginx": f_ts_nginx,
    "ts_syslog": f_ts_syslog,
    "git_date": f_git_date,
    "time": lambda ctx, tag: f"{ctx.rng.randint(7, 19)}:{ctx.rng.choice(['00', '15', '30', '45'])}",
    "amount": f_amount,
    "eur": f_eur,
    "eur_en": f_amount,
    "order": lambda ctx, tag: f"ORD-{ctx.rng.randint(2019, 2025)}-{ctx.rng.randint(10000, 999999)}",
    "invoice": lambda ctx, tag: f"INV-{ctx.rng.randint(2019, 2025)}-{ctx.rng.randint(1, 9999):04d}",
    "ticket": numn(10000, 999999),
    "uuid": f_uuid,
    "sha": hexn(40),
    "hex8": hexn(8),
    "hex16": hexn(16),
    "hex17": hexn(17),
    "hex40": hexn(40),
    "int": numn(1, 99999),
    "pid": numn(300, 65000),
    "port": numn(32768, 60999),
    "ext": numn(10, 4999),
    "otp": lambda ctx, tag: digits(ctx.rng, 6),
    "exp": lambda ctx, tag: f"{ctx.rng.randint(1, 12):02d}/{ctx.rng.randint(25, 31)}",
    "mmyy": lambda ctx, tag: f"{ctx.rng.randint(1, 12):02d}{ctx.rng.randint(25, 31)}",
    "mm": numn(1, 12),
    "yyyy": numn(2025, 2031),
    "year": numn(2019, 2024),
    "cvv": lambda ctx, tag: digits(ctx.rng, 3),
    "cents": numn(500, 250000),
    "ein": lambda ctx, tag: f"{ctx.rng.randint(10, 98)}-{digits(ctx.rng, 7)}",
    "ins": lambda ctx, tag: ctx.rng.choice(["XEH", "W", "ZGP", "UHC"]) + digits(ctx.rng, 9),
    "mrn": lambda ctx, tag: "MRN-" + digits(ctx.rng, 7),
    "bic": f_bic,
    "bank_de": pick(BANKS_DE),
    "job": pick(JOBS),
    "dept": pick(DEPTS),
    "model": pick(MODELS),
    "svc": pick(SERVICES),
    "user": pick(["jdoe", "mkowalski", "apatel", "deploy", "ci-bot", "lnguyen", "sre-oncall"]),
    "proj": lambda ctx, tag: f"{ctx.rng.choice(['acme', 'nimbus', 'kestrel', 'globex'])}-prod-{digits(ctx.rng, 6)}",
    "digits21": lambda ctx, tag: str(ctx.rng.randint(1, 9)) + digits(ctx.rng, 20),
    "txn": lambda ctx, tag: "txn_" + "".join(ctx.rng.choice(ALNUM) for _ in range(14)),
    "masked_card": f_masked_card,
    "us_state": pick(["Texas", "Ohio", "California", "New York", "Florida", "Oregon", "Georgia", "Illinois"]),
    "weekday": pick(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
}


# -------------------------------------------------------------------------------------------- templates
# (kind, locale, text). §FAMILY.slot§ inserts a labeled entity (a tag after @ reuses one value within the
# text and, for e-mails, ties it to the person of that tag); §filler§ inserts unlabeled filler text.

Tpl = tuple[str, str, str]

EMAIL_T: list[Tpl] = [
    (
        "ticket_export",
        "en",
        "Ticket #§ticket§ | Status: open | Channel: email\nRequester: §name§ <§EMAIL.personal§>\nCC: §EMAIL.corp@b§, "
        "§EMAIL.role§\nAssignee: §name@c§ (§EMAIL.corp@c§)\n\n--- message ---\nHi, I still can't log in. I tried "
        "resetting the password twice but the mail never arrives. My colleague (§EMAIL.corp@b§) has the same issue. "
        "We are on the Business plan, account §int§.\n\nAuto-reply sent from §EMAIL.role@r§ at §ts§",
    ),
    (
        "chat",
        "en",
        "Please deduplicate this contact list and keep the newest entry per person:\n"
        "§name@1§;§EMAIL.person@1§;§date_iso@1§\n§name@2§;§EMAIL.upper@2§;§date_iso@2§\n"
        "§name@1§;§EMAIL.person@1§;§date_iso@3§\n§name@3§;§EMAIL.longtld@3§;§date_iso@4§",
    ),
    (
        "chat",
        "en",
        "Can you help me write a short, friendly follow-up to §name§ (§EMAIL.person§)? We met at the §city§ trade "
        "show last week and she asked for our pricing deck. Please mention that my colleague §name@b§ is cc'd at "
        "§EMAIL.person@b§ and keep it under 150 words.",
    ),
    (
        "email_signature",
        "en",
        "Hi team,\n\nPlease find the Q3 vendor report attached. Numbers for EMEA are still preliminary.\n\n"
        "Best regards,\n§name§\n§job§ | §company§\n§street§, §city§\nMobile: §PHONE.intl§\nEmail: §EMAIL.corp§\n",
    ),
    (
        "email_header",
        "en",
        "---------- Forwarded message ---------\nFrom: §name§ <§EMAIL.person§>\nDate: §date§ at §time§\n"
        "Subject: Re: contract renewal for §company§\nTo: §name@b§ <§EMAIL.person@b§>\nCc: §EMAIL.role§\n\n"
        "Hi §first@b§, see below. Can you ask the assistant to summarize the open points?",
    ),
    (
        "csv",
        "en",
        "id,first_name,last_name,email,signup_date,plan\n§int@1§,§afirst@1§,§last@1§,§EMAIL.person@1§,§date_iso@1§,pro\n"
        "§int@2§,§afirst@2§,§last@2§,§EMAIL.person@2§,§date_iso@2§,free\n"
        "§int@3§,§afirst@3§,§last@3§,§EMAIL.upper@3§,§date_iso@3§,team\n",
    ),
    (
        "sql",
        "en",
        "INSERT INTO customers (id, full_name, email, created_at) VALUES (§int§, '§name§', '§EMAIL.any§', now());",
    ),
    ("sql", "en", "SELECT id, status FROM users WHERE lower(email) = '§EMAIL.lower§' LIMIT 1;"),
    (
        "json",
        "en",
        '{"user": {"id": "§uuid§", "name": "§name§", "email": "§EMAIL.any§", "email_verified": true}, '
        '"event": "signup", "ts": "§ts§"}',
    ),
    ("json", "en", '[{"contact":"§EMAIL.sub§","type":"primary"},{"contact":"§EMAIL.longtld§","type":"billing"}]'),
    ("log", "en", "§ts§ INFO  auth.reset password reset requested for §EMAIL.any§ (session=§hex8§)"),
    (
        "log",
        "en",
        "§ts_log§ WARNING smtp: 550 5.1.1 <§EMAIL.personal§>: Recipient address rejected: User unknown in "
        "virtual mailbox table",
    ),
    (
        "git",
        "en",
        "commit §sha§\nAuthor: §name§ <§EMAIL.person§>\nDate:   §git_date§\n\n    fix: handle empty cart in "
        "checkout\n\nWrite a changelog entry for this commit.",
    ),
    (
        "markdown",
        "en",
        "## Contacts\n\n- Press: [§name§](mailto:§EMAIL.person§)\n- Partnerships: §EMAIL.role§\n"
        "- Security reports: <§EMAIL.role@s§>\n\nRewrite this section in a friendlier tone.",
    ),
    (
        "hr_form",
        "en",
        "NEW HIRE ONBOARDING\nLegal name: §name§\nPreferred name: §first§\nPersonal email: §EMAIL.personal§\n"
        "Work email: §EMAIL.corp§\nStart date: §date§\nDepartment: §dept§\nManager: §name@b§ (§EMAIL.corp@b§)",
    ),
    (
        "chat",
        "en",
        "PLEASE UPDATE MY CONTACT EMAIL TO §EMAIL.upper§ AND REMOVE §EMAIL.upper@x§ FROM ALL MAILING LISTS. I HAVE "
        "ASKED THREE TIMES ALREADY.",
    ),
    ("edge", "en", "§EMAIL.any§"),
    ("edge", "en", "§EMAIL.any§ keeps bouncing, can you check why?"),
    ("edge", "en", "Reply-To:§EMAIL.any§"),
    ("edge", "en", "Who owns this address (§EMAIL.any§)?"),
    ("edge", "en", "Set \"§EMAIL.any§\" as owner and '§EMAIL.any§' as backup."),
    ("edge", "en", "to=§EMAIL.simple§;cc=§EMAIL.simple§,bcc=§EMAIL.simple§"),
    ("edge", "en", "Last one, I promise: §EMAIL.personal§."),
    (
        "email",
        "de",
        "Hallo §first@b§,\n\nbitte schick die Rechnung ab sofort an §EMAIL.role§ und nicht mehr an meine private "
        "Adresse §EMAIL.personal§.\n\nViele Grüße\n§name§",
    ),
    (
        "chat",
        "fr",
        "Bonjour, pouvez-vous transférer ce dossier à §EMAIL.person§ ? Mettez aussi §EMAIL.role§ en copie. Merci !",
    ),
    (
        "chat",
        "es",
        "Escríbeme a §EMAIL.person§ cuando tengas el presupuesto, o si es urgente al correo del trabajo §EMAIL.corp§.",
    ),
    ("chat", "ja", "お問い合わせは§EMAIL.role§までお願いします。担当：§name§（§EMAIL.corp§）"),
    ("chat", "zh", "请把会议纪要发到§EMAIL.qq§，抄送§EMAIL.person§，谢谢！"),
    ("chat", "it", "Ciao, il mio indirizzo email è cambiato: ora è §EMAIL.personal§. Puoi aggiornarlo nel CRM?"),
    ("chat", "nl", "Kun je de offerte sturen naar §EMAIL.corp§? Mijn collega §name@b§ (§EMAIL.corp@b§) leest mee."),
    ("chat", "pt", "Oi! Meu e-mail novo é §EMAIL.personal§, pode atualizar o cadastro?"),
    ("chat", "pl", "Proszę o przesłanie faktury na adres §EMAIL.role§. Pozdrawiam, §name§ (§EMAIL.personal§)"),
    ("chat", "ru", "Пришлите, пожалуйста, договор на §EMAIL.personal§. Спасибо!"),
    (
        "docs",
        "en",
        'Example request:\n\n```json\n{"email": "§EMAIL.doc§", "password": "correct horse battery staple"}\n```\n\n'
        "Explain what the 422 response means.",
    ),
    (
        "stacktrace",
        "en",
        'Traceback (most recent call last):\n  File "/app/users/service.py", line 88, in create_user\n'
        "    session.commit()\nsqlalchemy.exc.IntegrityError: (psycopg2.errors.UniqueViolation) duplicate key value "
        'violates unique constraint "users_email_key"\nDETAIL:  Key (email)=(§EMAIL.any§) already exists.\n\n'
        "How do I make this idempotent?",
    ),
    (
        "k8s",
        "en",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: alertmanager-config\ndata:\n  alertmanager.yml: |\n"
        "    receivers:\n      - name: oncall\n        email_configs:\n          - to: '§EMAIL.role§'\n"
        "            from: '§EMAIL.role@f§'\n            smarthost: smtp.§domain§:587\n",
    ),
    (
        "chat",
        "en",
        "I'm a support agent. Summarize this ticket and draft a reply.\n\nTicket #§ticket§ (priority: high)\n"
        "Customer: §name§ <§EMAIL.personal§>\nAccount owner: §name@b§, §EMAIL.corp@b§\n\nMessage:\nHi, I upgraded "
        "to the annual plan on §date§ but my invoices still go to my old address. Please send everything to "
        "§EMAIL.personal@n§ from now on. Thanks, §first§",
    ),
    (
        "vcard",
        "en",
        "BEGIN:VCARD\nVERSION:3.0\nFN:§name§\nORG:§company§\nTITLE:§job§\nEMAIL;TYPE=work:§EMAIL.corp§\n"
        "EMAIL;TYPE=home:§EMAIL.personal§\nTEL;TYPE=cell:§PHONE.e164§\nEND:VCARD",
    ),
    (
        "http",
        "en",
        "POST /api/v2/signup HTTP/1.1\nHost: app.§domain§\nContent-Type: application/x-www-form-urlencoded\n\n"
        "first_name=§afirst§&email=§EMAIL.simple§&plan=starter",
    ),
    (
        "calendar",
        "en",
        "Meeting: Quarterly business review\nOrganizer: §EMAIL.person§\nAttendees: §EMAIL.person@b§; "
        "§EMAIL.person@c§; §EMAIL.role§\nWhen: §date§, §time§ CET\nPlease draft an agenda.",
    ),
    ("chat", "en", "my email is §EMAIL.lower§ pls reset my password asap"),
    (
        "email",
        "en",
        "On §date§, §name§ <§EMAIL.any§> wrote:\n> Thanks for the quick turnaround.\n> Could you also send the "
        "signed NDA to §EMAIL.role§?\n\nTranslate this thread into German.",
    ),
    (
        "list",
        "en",
        "Unsubscribe these addresses from the newsletter:\n§EMAIL.any@1§\n§EMAIL.any@2§\n§EMAIL.any@3§\n§EMAIL.qq@4§",
    ),
    (
        "medical",
        "en",
        "Patient portal registration\nPatient: §name§   DOB: §dob§\nEmail for lab results: §EMAIL.personal§\n"
        "Preferred pharmacy: §company§, §city§",
    ),
    (
        "invoice",
        "en",
        "INVOICE §invoice§\nBill to: §company§, Attn: §name§ (§EMAIL.corp§)\nQuestions about this invoice? "
        "Contact §EMAIL.role§.\nTotal due: $§amount§",
    ),
    ("code", "en", 'DEFAULT_FROM_EMAIL = "§EMAIL.role§"\nADMINS = [("§name§", "§EMAIL.corp§")]\n'),
    ("code", "en", 'git config --global user.email "§EMAIL.person§"\ngit config --global user.name "§name§"'),
    (
        "yaml",
        "en",
        "maintainers:\n  - name: §name@1§\n    email: §EMAIL.person@1§\n  - name: §name@2§\n    email: §EMAIL.sub@2§\n",
    ),
]

PHONE_T: list[Tpl] = [
    (
        "chat",
        "en",
        "I run a small bakery in §us_place§ (US). Write a Google Business description. Facts: open 7am-3pm, "
        "gluten-free options, catering. Phone §PHONE.us_nat§, orders by text to §PHONE.us_dots§, email "
        "§EMAIL.role§.",
    ),
    (
        "crm_export",
        "en",
        '[{"name": "§name@1§", "mobile": "§PHONE.e164@1§", "opt_in": true}, {"name": "§name@2§", '
        '"mobile": "§PHONE.intl@2§", "opt_in": false}]',
    ),
    (
        "chat",
        "en",
        "My flight home got cancelled and I'm stuck in §us_place§. Please call me back on my US cell "
        "§PHONE.us_any§ as soon as a seat opens up.",
    ),
    (
        "email_signature",
        "en",
        "Best,\n§name§\n§job§, §company§\n§street§, §us_place§, USA\nOffice: §PHONE.us_intl§ ext. §ext§\n"
        "Mobile: §PHONE.us_e164§\n§EMAIL.corp§",
    ),
    ("json", "en", '{"to": "§PHONE.e164§", "from": "§PHONE.us_e164§", "body": "Your verification code is §otp§"}'),
    ("log", "en", "§ts§ WARN sms-gateway delivery failed to=§PHONE.e164§ status=undelivered error_code=30003"),
    (
        "csv",
        "en",
        "name,phone,source\n§name@1§,§PHONE.intl§,webinar\n§name@2§,§PHONE.intl§,trade show\n"
        "§name@3§,§PHONE.e164§,website\n",
    ),
    ("sql", "en", "INSERT INTO contacts (name, phone) VALUES ('§name§', '§PHONE.intl§'), ('§name@b§', '§PHONE.00§');"),
    (
        "toll_free",
        "en",
        "Questions about your order? Call us toll-free at §PHONE.us_tf§ (US and Canada, Mon-Fri 8am-8pm ET) or "
        "from the UK on §PHONE.gb_tf_nat§.",
    ),
    (
        "extension",
        "en",
        "For the Chicago office (USA) dial §PHONE.us_nat§ x§ext§; for billing use §PHONE.us_dash§, ext. §ext@b§.",
    ),
    ("dots", "en", "Reach our Austin, Texas team at §PHONE.us_dots§ or text §PHONE.us_dots@t§ after hours."),
    ("intl_00", "en", "Please call me on §PHONE.00§ (I'm travelling, so WhatsApp works best)."),
    ("trunk_prefix", "en", "Our London office: §PHONE.gb_trunk§ (switchboard), fax §PHONE.gb_trunk@f§."),
    ("trunk_prefix", "de", "Zentrale Frankfurt: §PHONE.de_trunk§ – aus dem Ausland bitte so wählen."),
    (
        "national",
        "de",
        "Sehr geehrte Damen und Herren,\n\nich bin telefonisch unter §PHONE.de_nat§ (Festnetz) oder mobil unter "
        "§PHONE.de_mob_nat§ erreichbar.\n\nMit freundlichen Grüßen\n§name§",
    ),
    ("national", "de", "Rückrufbitte: Herr §last§ bittet um Rückruf unter §PHONE.de_slash§ wegen Auftrag §order§."),
    (
        "national",
        "fr",
        "Bonjour, vous pouvez me joindre au §PHONE.fr_nat§ du lundi au vendredi, ou sur mon portable au "
        "§PHONE.fr_mob_nat§. Cordialement, §name§",
    ),
    ("national", "fr", "Tél. : §PHONE.fr_dots§ – Service client §company§ (France)"),
    (
        "national",
        "es",
        "Hola, mi número es §PHONE.es_nat§, llámame después de las 18:00. Si no contesto, escríbeme por WhatsApp "
        "al §PHONE.es_mob_nat§.",
    ),
    (
        "national",
        "it",
        "Buongiorno, il mio numero di cellulare è §PHONE.it_mob_nat§; in ufficio rispondo al §PHONE.it_nat§.",
    ),
    ("national", "nl", "Bel ons gerust op §PHONE.nl_nat§ (ma t/m vr, 9:00 tot 17:00) of app naar §PHONE.nl_mob_nat§."),
    ("national", "nl", "Ons kantoor in Brussel (België) is bereikbaar op §PHONE.be_nat§."),
    ("national", "de", "Kontakt Schweiz: Telefon §PHONE.ch_nat§, Handy §PHONE.ch_mob_nat§"),
    ("national", "de", "Unser Büro in Wien, Österreich: Tel. §PHONE.at_nat§"),
    ("national", "sv", "Ring mig på §PHONE.se_nat§ om något är oklart. Hälsningar från Sverige, §name§"),
    ("national", "nb", "Ring oss på §PHONE.no_nat§ hvis du har spørsmål om bestillingen (kundeservice Norge)."),
    ("national", "da", "Du kan ringe til os på §PHONE.dk_nat§ (Danmark) alle hverdage."),
    ("national", "fi", "Soita meille numeroon §PHONE.fi_nat§ (Suomi), arkisin 8-16."),
    ("national", "pl", "Proszę o kontakt pod numerem §PHONE.pl_nat§ lub komórkowym §PHONE.pl_mob_nat§."),
    ("national", "pt", "Ligue para a nossa loja em Lisboa, Portugal: §PHONE.pt_nat§."),
    ("national", "en", "Dublin office, Ireland: §PHONE.ie_nat§, ask for §first§."),
    (
        "national",
        "en",
        "Hi, I'm calling about my broadband in Manchester, UK. My mobile is §PHONE.gb_mob_nat§ and the landline is "
        "§PHONE.gb_nat§.",
    ),
    (
        "national",
        "en",
        "G'day, give us a call in Sydney, Australia on §PHONE.au_nat§ or toll free on §PHONE.au_tf_nat§. "
        "Mobile: §PHONE.au_mob_nat§",
    ),
    ("national", "en", "Auckland, New Zealand office: §PHONE.nz_nat§"),
    ("national", "en", "Customer care (India): §PHONE.in_mob_nat§, Mon-Sat 10am to 6pm IST."),
    ("national", "ja", "東京本社（日本）電話番号：§PHONE.jp_nat§（平日9時〜18時）"),
    ("national", "pt", "Atendimento no Brasil: §PHONE.br_mob_nat§ (WhatsApp) ou §PHONE.br_nat§."),
    ("national", "es", "Llámenos en México al §PHONE.mx_nat§."),
    ("national", "en", "Cape Town, South Africa: call §PHONE.za_nat§ or §PHONE.za_mob_nat§."),
    ("national", "en", "Singapore hotline: §PHONE.sg_nat§"),
    ("national", "en", "Our Toronto, Canada branch: §PHONE.ca_nat§"),
    ("national", "de", "Kostenlose Hotline in Deutschland: §PHONE.de_tf_nat§"),
    (
        "medical",
        "en",
        "EMERGENCY CONTACT (US)\nName: §name@b§\nRelationship: spouse\nPhone: §PHONE.us_any§\nAlt. phone: "
        "§PHONE.us_any@a§",
    ),
    ("html", "en", '<a href="tel:§PHONE.us_rfc3966§;ext=§ext§">Call sales</a>'),
    ("html", "en", '<a class="btn" href="tel:§PHONE.e164§">Call us</a>'),
    ("edge", "en", "§PHONE.intl§"),
    ("edge", "en", "§PHONE.e164§ called twice and left no voicemail."),
    ("edge", "en", "Who is calling from (§PHONE.intl§)?"),
    ("edge", "en", "phone:§PHONE.e164§;"),
    ("edge", "en", '"§PHONE.intl§"'),
    ("edge", "en", "Call me: §PHONE.intl§."),
    ("docs", "en", "The hotline in the movie was §PHONE.us_doc§; is that a real number in the US?"),
    ("chat", "en", "Can you format these numbers consistently in E.164? §PHONE.intl@1§, §PHONE.00@2§, §PHONE.intl@3§"),
    ("env", "en", "TWILIO_FROM_NUMBER=§PHONE.us_e164§\nALERT_SMS_TO=§PHONE.e164§\n"),
    (
        "transcript",
        "en",
        "[00:01:12] Agent: Could you confirm the best number to reach you?\n[00:01:15] Caller: Yeah, it's "
        "§PHONE.intl§.\n[00:01:19] Agent: Thank you.",
    ),
    (
        "invoice",
        "en",
        "§company§\n§street§, §city§\nPhone §PHONE.intl§ | §EMAIL.role§\n\nINVOICE §invoice§\nAmount due: §amount§ EUR",
    ),
    (
        "hr_form",
        "en",
        "Candidate: §name§\nPhone (mobile): §PHONE.intl§\nPhone (home, US): §PHONE.us_nat§\nEmail: §EMAIL.personal§"
        "\nNotes: available from §date§",
    ),
    (
        "yaml",
        "en",
        'oncall:\n  primary:\n    name: §name@1§\n    phone: "§PHONE.e164@1§"\n  secondary:\n    name: '
        '§name@2§\n    phone: "§PHONE.intl@2§"\n',
    ),
]

CARD_T: list[Tpl] = [
    (
        "chat",
        "en",
        "My grandmother got this text and wants to know if it is a scam: 'Your card §CARD.spaced§ has been "
        "suspended. Call §PHONE.us_tf§ immediately.' The card number really is hers. What should she do?",
    ),
    (
        "chat",
        "en",
        "Hi, I was charged twice for order §order§. The card I used is §CARD.any§ (exp §exp§). Can you refund one "
        "of the two charges?",
    ),
    (
        "json",
        "en",
        '{"payment_method": {"type": "card", "card": {"number": "§CARD.compact§", "exp_month": §mm§, '
        '"exp_year": §yyyy§, "cvc": "§cvv§"}}, "amount": §cents§, "currency": "usd"}',
    ),
    ("log", "en", "§ts_log§ DEBUG payments.gateway body: card_number=§CARD.compact§&exp=§mmyy§&cvv=§cvv§&zip=§zip5§"),
    (
        "form",
        "en",
        "PAYMENT DETAILS\nCardholder name: §NAME§\nCard number: §CARD.spaced§\nExpiry date: §exp§\nSecurity code: "
        "§cvv§\nBilling ZIP: §zip5§",
    ),
    (
        "csv",
        "en",
        "txn_id,pan,amount,currency,status\n§txn@1§,§CARD.compact@1§,§amount@1§,USD,captured\n"
        "§txn@2§,§CARD.compact@2§,§amount@2§,USD,refunded\n§txn@3§,§masked_card§,§amount@3§,EUR,captured\n",
    ),
    ("sql", "en", "UPDATE billing_profiles SET pan = '§CARD.compact§', exp = '§exp§' WHERE customer_id = §int§;"),
    (
        "chat",
        "de",
        "Meine Kreditkartennummer lautet §CARD.spaced§, gültig bis §exp§. Bitte buchen Sie die Anzahlung ab.",
    ),
    ("form", "fr", "Numéro de carte : §CARD.spaced§ – date d'expiration §exp§ – cryptogramme §cvv§"),
    ("form", "es", "Número de tarjeta: §CARD.dashed§. Titular: §name§."),
    ("form", "ja", "カード番号：§CARD.spaced§　有効期限：§exp§"),
    ("chat", "it", "Il numero della mia carta è §CARD.spaced§ con scadenza §exp§."),
    ("chat", "nl", "Mijn creditcardnummer is §CARD.dashed§, vervaldatum §exp§."),
    ("form", "pt", "Número do cartão: §CARD.spaced§ – validade §exp§"),
    ("form", "ru", "Номер карты: §CARD.mir§, срок действия §exp§"),
    ("chat", "en", "Please put the hotel deposit on my Amex §CARD.amex§, the name on the card is §NAME§."),
    (
        "docs",
        "en",
        "For testing, use the card number §CARD.doc§ with any future expiry date and any three-digit CVC. Why does "
        "my integration still return card_declined?",
    ),
    (
        "transcript",
        "en",
        "Agent: Can I get the long number on the front of the card?\nCaller: Sure, it's §CARD.spaced§.\n"
        "Agent: And the expiry?\nCaller: §exp§.",
    ),
    (
        "stacktrace",
        "en",
        "stripe.error.CardError: Request req_§hex16§: Your card was declined.\n  card: §CARD.compact§\n"
        "  decline_code: insufficient_funds\nWhy is this happening on every retry?",
    ),
    ("edge", "en", "§CARD.any§"),
    ("edge", "en", "(§CARD.any§)"),
    ("edge", "en", "card:§CARD.compact§;"),
    ("edge", "en", '"§CARD.compact§"'),
    ("edge", "en", "§CARD.any§ is the card I want to remove."),
    ("edge", "en", "Charge it to §CARD.any§."),
    (
        "markdown",
        "en",
        "| Brand | Number | Expiry |\n|---|---|---|\n| Visa | §CARD.visa§ | §exp@1§ |\n| Mastercard | §CARD.mc§ | "
        "§exp@2§ |\n| Amex | §CARD.amex§ | §exp@3§ |",
    ),
    (
        "email",
        "en",
        "Dear billing team,\n\nplease charge the annual renewal (invoice §invoice§) to our corporate card "
        "§CARD.any§, expiry §exp§. The card is registered to §name§, §street§, §us_place§.\n\nKind regards,\n"
        "§name§\n§EMAIL.corp§",
    ),
    (
        "chat",
        "en",
        "Please fill in this booking form for me. Name: §name§, email: §EMAIL.personal§, phone: §PHONE.intl§, "
        "card: §CARD.any§ exp §exp§ CVV §cvv§. Book the cheapest refundable room in §city§ from §date§ for three "
        "nights and tell me the total.",
    ),
    ("list", "en", "JCB §CARD.jcb§ / Diners Club §CARD.diners§ / Discover §CARD.discover§"),
    ("chat", "en", "Is my UnionPay card §CARD.unionpay§ accepted in your online shop?"),
    ("chat", "en", "The Maestro card §CARD.maestro§ keeps failing 3-D Secure."),
    ("xml", "en", "<Payment><CardNumber>§CARD.compact§</CardNumber><Expiry>§mmyy§</Expiry></Payment>"),
    ("yaml", "en", 'test_cards:\n  visa: "§CARD.visa§"\n  mastercard: "§CARD.mc§"\n  amex: "§CARD.amex§"\n'),
    (
        "support_ticket",
        "en",
        "Ticket #§ticket§\nFrom: §name§\nSubject: refund\n\nI cancelled within 24h. Card on file: §CARD.any§. "
        "Order §order§, amount $§amount§. The app shows §masked_card§ but that's the old card.",
    ),
    (
        "code",
        "en",
        'def test_charge():\n    resp = client.charge(card="§CARD.compact§", cvc="§cvv§", amount=§cents§)\n'
        "    assert resp.ok\n",
    ),
]

IBAN_T: list[Tpl] = [
    (
        "vendor_master",
        "en",
        "Vendor master data change request\nVendor: §company§ (ID §int§)\nContact: §name§, §EMAIL.corp§, "
        "§PHONE.intl§\nOld bank account: §IBAN.any@o§\nNew bank account: §IBAN.any@n§\nReason: bank merger\n"
        "Approved by: §name@b§",
    ),
    (
        "invoice",
        "de",
        "Rechnung Nr. §invoice§\nBitte überweisen Sie den Betrag von §eur§ EUR innerhalb von 14 Tagen.\n"
        "Bankverbindung: §bank_de§ · IBAN: §IBAN.DE_grouped§ · BIC: §bic§\n§company§ · Geschäftsführer: §name§",
    ),
    (
        "bank_transfer",
        "en",
        "Please wire the deposit of EUR §eur_en§ to:\nAccount holder: §name§\nIBAN: §IBAN.any§\nBIC/SWIFT: §bic§"
        "\nReference: §invoice§",
    ),
    (
        "bank_transfer",
        "fr",
        "Merci d'effectuer le virement sur le compte suivant : IBAN §IBAN.FR§ (titulaire : §name§).",
    ),
    ("chat", "es", "Te paso mi IBAN para la devolución: §IBAN.ES§. ¡Gracias!"),
    ("bank_transfer", "nl", "Graag het bedrag overmaken naar §IBAN.NL§ t.n.v. §name§ o.v.v. factuurnummer §invoice§."),
    ("invoice", "it", "Coordinate bancarie per il bonifico – IBAN: §IBAN.IT§ – intestato a §company§."),
    (
        "json",
        "en",
        '{"creditor": {"name": "§company§", "iban": "§IBAN.compact§"}, "debtor": {"name": "§name§", "iban": '
        '"§IBAN.compact@d§"}, "amount": "§eur_en§", "currency": "EUR", "remittance": "§invoice§"}',
    ),
    (
        "csv",
        "de",
        "personalnr;name;iban;netto\n§int@1§;§name@1§;§IBAN.DE@1§;§eur@1§\n§int@2§;§name@2§;§IBAN.compact@2§;"
        "§eur@2§\n§int@3§;§name@3§;§IBAN.AT@3§;§eur@3§\n",
    ),
    ("sql", "en", "INSERT INTO payees (name, iban, bic) VALUES ('§name§', '§IBAN.compact§', '§bic§');"),
    (
        "chat",
        "en",
        "My landlord sent me this IBAN for the deposit: §IBAN.any§. Can you check whether it looks legit before I "
        "send the money?",
    ),
    (
        "xml",
        "en",
        '<CdtTrfTxInf><Amt><InstdAmt Ccy="EUR">§eur_en§</InstdAmt></Amt><Cdtr><Nm>§company§</Nm></Cdtr>'
        "<CdtrAcct><Id><IBAN>§IBAN.compact§</IBAN></Id></CdtrAcct></CdtTrfTxInf>",
    ),
    ("edge", "en", "§IBAN.any§"),
    ("edge", "en", "IBAN:§IBAN.compact§"),
    ("edge", "en", "(§IBAN.grouped§)"),
    ("edge", "en", '"§IBAN.compact§",'),
    ("edge", "en", "§IBAN.any§ is the new account."),
    ("edge", "en", "Send it to §IBAN.any§."),
    ("bank_transfer", "en", "Beneficiary bank details (Saudi Arabia)\nBeneficiary: §name§\nIBAN: §IBAN.SA§"),
    ("bank_transfer", "en", "UAE payroll account for §name§: IBAN §IBAN.AE§ (Emirates NBD)"),
    ("bank_transfer", "en", "Supplier in Istanbul, Turkey: IBAN §IBAN.TR§"),
    ("bank_transfer", "en", "Israeli account for the grant: §IBAN.IL_grouped§"),
    ("bank_transfer", "pt", "Dados para transferência internacional (Brasil): IBAN §IBAN.BR§"),
    ("bank_transfer", "en", "Qatar office account: §IBAN.QA§; Kuwait office: §IBAN.KW§."),
    ("bank_transfer", "en", "Please pay the Reykjavik hotel (Iceland) to IBAN §IBAN.IS§."),
    ("bank_transfer", "en", "Ukrainian supplier, IBAN §IBAN.UA§, purpose: invoice §invoice§"),
    ("docs", "en", "The IBAN example in the spec is §IBAN.doc§. Write a regex that validates it."),
    ("form", "pl", "Numer rachunku (IBAN): §IBAN.PL_grouped§"),
    ("form", "pt", "IBAN para transferência: §IBAN.PT§"),
    ("invoice", "de", "Bitte auf unser Konto bei der PostFinance (Schweiz) überweisen: §IBAN.CH_grouped§"),
    ("form", "de", "IBAN: §IBAN.AT§ lautend auf §name§"),
    ("invoice", "fr", "Veuillez verser le montant sur le compte §IBAN.BE_grouped§ avant le §date§."),
    ("invoice", "en", "Our UK account: IBAN §IBAN.GB§, BIC §bic§"),
    ("invoice", "sv", "Betala till IBAN §IBAN.SE_grouped§ och ange fakturanummer §invoice§."),
    ("invoice", "da", "Beløbet bedes indbetalt på IBAN §IBAN.DK§."),
    ("invoice", "fi", "Maksu tilille §IBAN.FI_grouped§, viite §int§."),
    ("invoice", "nb", "Kontonummer (IBAN): §IBAN.NO§"),
    (
        "email",
        "en",
        "Hi §first@b§,\n\nthe supplier changed their bank details. Old IBAN: §IBAN.any@o§\nNew IBAN: §IBAN.any@n§\n\n"
        "Can you draft a message asking them to confirm by phone? Their number is §PHONE.intl§.\n\nThanks,\n§name§",
    ),
    ("chat", "en", "Two IBANs, same person. Which one is right? §IBAN.compact@a§ or §IBAN.grouped@b§"),
    (
        "ledger",
        "en",
        "§date_iso§  SEPA-CT  §IBAN.compact§  -§eur_en§  rent\n§date_iso@2§  SEPA-DD  §IBAN.compact@2§  -49.99",
    ),
    ("yaml", "en", 'payout:\n  method: sepa\n  account_holder: "§name§"\n  iban: §IBAN.compact§\n  bic: §bic§\n'),
    ("form", "es", "Domiciliación bancaria – Titular: §name§ – IBAN: §IBAN.ES_grouped§"),
    ("form", "it", "Per il rimborso indicare l'IBAN: §IBAN.IT_grouped§"),
    ("invoice", "en", "Greek supplier §IBAN.GR§ / Cypriot branch §IBAN.CY_grouped§ / Maltese account §IBAN.MT§"),
    ("invoice", "en", "Baltic accounts: LT §IBAN.LT§, LV §IBAN.LV§, EE §IBAN.EE§"),
    ("invoice", "en", "Central Europe: CZ §IBAN.CZ_grouped§ | SK §IBAN.SK§ | HU §IBAN.HU§ | SI §IBAN.SI§"),
    ("invoice", "en", "Balkans: HR §IBAN.HR§, BG §IBAN.BG§, RO §IBAN.RO_grouped§"),
    ("invoice", "fr", "Relevé d'identité bancaire (Luxembourg) : §IBAN.LU§ ; Monaco : §IBAN.MC§"),
]

SSN_T: list[Tpl] = [
    (
        "chat",
        "en",
        "Clean up this customer record and output JSON with the fields name, ssn, email, phone, card, "
        "signup_ip:\n\n§name§ / SSN: §SSN.dashed§ / §EMAIL.personal§ / cell (US) §PHONE.us_any§ / "
        "card §CARD.any§ / signed up from §IP.PUB§",
    ),
    (
        "hr_form",
        "en",
        "EMPLOYEE INFORMATION\nFull name: §name§\nSSN: §SSN.dashed§\nDate of birth: §dob§\nHome address: "
        "§street§, §us_place§\nPhone: §PHONE.us_nat§",
    ),
    (
        "tax_form",
        "en",
        "Form W-2 Wage and Tax Statement §year§\na Employee's social security number: §SSN.dashed§\n"
        "b Employer identification number (EIN): §ein§\nc Employer's name: §company§\ne Employee's first name: "
        "§first§  Last name: §last§\n1 Wages, tips, other compensation: §amount§",
    ),
    ("chat", "en", "I'm filling out my FAFSA and it says my SSN §SSN.dashed§ doesn't match my name. What should I do?"),
    (
        "medical",
        "en",
        "PATIENT INTAKE\nPatient: §name§   DOB: §dob§\nSSN: §SSN.any§\nInsurance member ID: §ins§\n"
        "Reason for visit: persistent cough for 3 weeks\nAllergies: penicillin",
    ),
    (
        "csv",
        "en",
        "emp_id,name,ssn,dept\n§int@1§,§name@1§,§SSN.dashed@1§,§dept@1§\n§int@2§,§name@2§,§SSN.dashed@2§,§dept@2§"
        "\n§int@3§,§name@3§,§SSN.compact@3§,§dept@3§\n",
    ),
    ("sql", "en", "INSERT INTO employees (name, ssn, hired) VALUES ('§name§', '§SSN.dashed§', '§date_iso§');"),
    (
        "json",
        "en",
        '{"applicant": {"name": "§name§", "ssn": "§SSN.compact§", "dob": "§date_iso§"}, "product": "personal_loan"}',
    ),
    ("label", "en", "SSN §SSN.compact§"),
    ("label", "en", "Social Security No. §SSN.spaced§"),
    ("label", "en", "SS#: §SSN.dashed§"),
    ("label", "en", "social security number: §SSN.compact§"),
    ("chat", "es", "Número de Seguro Social: §SSN.dashed§. Necesito ayuda para llenar el formulario W-4."),
    (
        "report",
        "en",
        "BACKGROUND CHECK REPORT\nSubject: §NAME§\nSSN: §SSN.dashed§ (issued in §us_state§)\nAliases: none\n"
        "Address history: §street§, §us_place§\nCriminal records: none found",
    ),
    ("log", "en", "§ts§ ERROR kyc.validator field=ssn value=§SSN.dashed§ reason=name_mismatch applicant=§uuid§"),
    (
        "email",
        "en",
        "Hi HR,\n\nMy last paystub lists my SSN as §SSN.dashed@w§ but the correct one is §SSN.dashed@c§. Can you fix "
        "it before the W-2s go out?\n\nThanks,\n§name§",
    ),
    (
        "tax_form",
        "en",
        "Your first name and middle initial: §first§ §initial§.  Last name: §last§  Your social security number: "
        "§SSN.spaced§\nIf joint return, spouse's first name: §first@s§  Spouse's social security number: "
        "§SSN.spaced@s§",
    ),
    (
        "form",
        "en",
        "Credit application\nApplicant: §name§\nSocial Security Number: §SSN.dashed§\nEmail: §EMAIL.personal§\n"
        "Mobile (US): §PHONE.us_any§\nAnnual income: $§amount§",
    ),
    ("edge", "en", "§SSN.dashed§"),
    ("edge", "en", "SSN:§SSN.dashed§."),
    ("edge", "en", "(SSN §SSN.dashed§)"),
    ("edge", "en", '{"ssn":"§SSN.dashed§"}'),
    ("edge", "en", "§SSN.dashed§ is my social, please don't store it."),
    ("chat", "en", "my social is §SSN.spaced§ can u check if my tax refund was sent"),
    (
        "markdown",
        "en",
        "| Name | SSN | DOB |\n|---|---|---|\n| §name@1§ | §SSN.dashed@1§ | §dob@1§ |\n| §name@2§ | §SSN.dashed@2§ | "
        "§dob@2§ |",
    ),
    (
        "tax_form",
        "en",
        "Employee's Withholding Certificate (Form W-4)\n(a) First name and middle initial: §first§ §initial§.\n"
        "Last name: §last§\n(b) Social security number: §SSN.dashed§\nAddress: §street§\nCity or town, state, and "
        "ZIP code: §us_place§",
    ),
    ("yaml", "en", 'applicant:\n  name: §name§\n  ssn: "§SSN.dashed§"\n  dob: §date_iso§\n'),
    (
        "chat",
        "en",
        "Here is the info for my mom's Medicare application, please put it in JSON:\nName: §name§\nDOB: §dob§\n"
        "SSN §SSN.compact§\nAddress: §street§, §us_place§\nPhone: §PHONE.us_nat§",
    ),
    (
        "email",
        "en",
        "Subject: I-9 documents\n\n§first@b§, attached are my passport scan and my Social Security card. For the "
        "form: SSN §SSN.dashed§, date of birth §dob§. Let me know if you need anything else.\n§name§",
    ),
    ("code", "en", 'TEST_APPLICANT = {"first": "§afirst§", "ssn": "§SSN.dashed§", "state": "§us_state§"}'),
    ("transcript", "en", "Caller: My social? Sure, it's §SSN.spaced§.\nAgent: Thank you, one moment while I verify."),
]

IP_T: list[Tpl] = [
    (
        "incident",
        "en",
        "INCIDENT REPORT §ticket§\nSummary: credential stuffing against /login from §IP.PUB@1§ and §IP.PUB@2§ "
        "(IPv6 §IP.V6@3§).\nFirst seen: §ts§\nAffected account: §EMAIL.personal§\nMitigation: blocked §IP.PUB@1§ "
        "at the edge, rate limit lowered on the origin §IP.PRIV§.\nOn-call: §name§, §PHONE.intl§",
    ),
    (
        "nginx_log",
        "en",
        '§IP.PUB§ - - [§ts_nginx§] "GET /v1/models HTTP/1.1" 200 512 "-" "python-requests/2.31.0"\n'
        '§IP.PUB@2§ - - [§ts_nginx@2§] "POST /v1/chat/completions HTTP/1.1" 429 87 "-" "OpenAI/Python 1.30.1"',
    ),
    (
        "auth_log",
        "en",
        "§ts_syslog§ bastion sshd[§pid§]: Failed password for invalid user admin from §IP.PUB§ port §port§ ssh2\n"
        "§ts_syslog@2§ bastion sshd[§pid@2§]: Accepted publickey for deploy from §IP.PRIV§ port §port@2§ ssh2",
    ),
    (
        "k8s",
        "en",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\nspec:\n  type: ClusterIP\n  clusterIP: §IP.PRIV§\n"
        "  ports:\n    - port: 5432\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: api\nspec:\n  hostAliases:\n"
        '    - ip: "§IP.PRIV@h§"\n      hostnames: ["legacy-db.internal"]\n',
    ),
    (
        "hosts_file",
        "en",
        "§IP.LOOP§   localhost\n§IP.LOOP6§         localhost ip6-localhost\n§IP.PRIV§   db-primary.internal\n"
        "§IP.PRIV@2§   cache.internal\n",
    ),
    (
        "stacktrace",
        "en",
        'psycopg2.OperationalError: connection to server at "§IP.PRIV§", port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?",
    ),
    (
        "stacktrace",
        "en",
        "redis.exceptions.ConnectionError: Error 111 connecting to §IP.PRIV§:6379. Connection refused.",
    ),
    (
        "stacktrace",
        "en",
        "java.net.ConnectException: Connection refused: /§IP.V4§:9092\n\tat sun.nio.ch.Net.pollConnect(Native Method)",
    ),
    (
        "curl",
        "en",
        "curl -v http://§IP.V4@s§:8080/healthz\n*   Trying §IP.V4@s§:8080...\n* connect to §IP.V4@s§ port 8080 failed: "
        "Connection refused",
    ),
    ("chat", "en", "Why can't I ping §IP.PRIV§ from my laptop? I can reach §IP.PRIV@g§ (the gateway) just fine."),
    ("http", "en", "X-Forwarded-For: §IP.PUB§, §IP.PUB@p§\nX-Real-IP: §IP.PUB@r§\nHost: api.internal"),
    ("json", "en", '{"event": "login", "user_id": §int§, "client_ip": "§IP.ANY§", "ts": "§ts§"}'),
    (
        "ifconfig",
        "en",
        "en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500\n\tinet6 §IP.LINK6§ prefixlen 64 "
        "secured scopeid 0x6\n\tinet §IP.PRIV§ netmask 0xffffff00\n\tinet6 §IP.V6§ prefixlen 64 autoconf secured",
    ),
    ("url", "en", "curl -g 'http://[§IP.V6§]:8443/metrics'"),
    ("url", "en", "Upstream https://[§IP.DOC6§]:443/v1/embeddings timed out after 30s"),
    ("nginx_log", "en", '§IP.V6§ - - [§ts_nginx§] "GET / HTTP/2.0" 301 0 "-" "curl/8.5.0"'),
    ("log", "en", "§ts_log§ INFO  client connected from §IP.MAPPED6§ (IPv4-mapped)"),
    ("log", "en", "DNS64 synthesized §IP.NAT64§ for the legacy host"),
    ("config", "en", "Assign the static address §IP.FULL6§ to eth0 in netplan, what else do I need?"),
    ("firewall_log", "en", "§ts_syslog§ fw01 kernel: DENY IN=eth0 SRC=§IP.UPPER6§ DST=§IP.UPPER6@d§ PROTO=TCP DPT=22"),
    ("chat", "en", "ping6 §IP.LINK6§ works but ssh to it fails with 'Network is unreachable'."),
    (
        "chat",
        "en",
        "The service only listens on §IP.LOOP§:11434, how do I expose it? It also binds [§IP.LOOP6§]:11434.",
    ),
    ("docs", "en", "For examples, use the documentation addresses §IP.DOC§ or §IP.DOC6§."),
    ("edge", "en", "§IP.V4§"),
    ("edge", "en", "§IP.V6§"),
    ("edge", "en", "ip=§IP.V4§;"),
    ("edge", "en", "(§IP.PUB§)"),
    ("edge", "en", '"§IP.V6§"'),
    ("edge", "en", "Blocked §IP.PUB§."),
    ("edge", "en", "[§IP.V6§]:51820"),
    ("edge", "en", "§IP.V4§:443 refused the connection"),
    ("shell", "en", "iptables -A INPUT -s §IP.PUB§ -j DROP\niptables -A INPUT -s §IP.PUB@2§ -j DROP"),
    ("config", "en", "[Peer]\nEndpoint = §IP.PUB§:51820\nPersistentKeepalive = 25\n"),
    (
        "docker_compose",
        "en",
        'services:\n  app:\n    extra_hosts:\n      - "host.docker.internal:§IP.PRIV§"\n    dns:\n      - §IP.PUB§\n',
    ),
    (
        "terraform",
        "en",
        'resource "aws_network_interface" "web" {\n  private_ips = ["§IP.PRIV§"]\n  subnet_id = "subnet-§hex17§"\n}\n',
    ),
    ("traceroute", "en", " 1  §IP.PRIV§  0.412 ms\n 2  §IP.PUB§  8.331 ms\n 3  §IP.PUB@3§  12.904 ms"),
    (
        "chat",
        "en",
        "Our Postgres replica at §IP.PRIV§ keeps falling behind. The primary is §IP.PRIV@p§, and the app servers "
        "connect from §IP.PRIV@a§ and §IP.PRIV@b§. Log line:\n\n§ts_log§ LOG:  connection received: host=§IP.PRIV@a§ "
        "port=§port§\n\nWhat should I look at first?",
    ),
    ("json", "en", '{"remote_addr": "§IP.V6§", "remote_port": §port§, "tls": "TLSv1.3"}'),
    ("chat", "en", "Dual-stack check: A record → §IP.PUB§, AAAA record → §IP.V6§"),
    ("url", "en", "Open http://§IP.PRIV§/admin in the browser and log in with the default account."),
    ("log", "en", '§ts§ level=warn msg="rate limited" remote=§IP.PUB§:§port§ path=/v1/completions'),
    ("config", "en", "bind-address = §IP.PRIV§\nmysqlx-bind-address = §IP.LOOP§\n"),
    ("log", "en", "§ts_syslog§ dhcpd: DHCPACK on §IP.PRIV§ to 3c:22:fb:91:0a:7e (macbook) via eth1"),
    ("log", "en", "§ts_log§ WARN unique-local peer §IP.ULA6§ is unreachable, falling back to §IP.PRIV§"),
    ("apache_log", "en", '§IP.ANY§ - §user§ [§ts_nginx§] "GET /wp-login.php HTTP/1.1" 404 196'),
]

SECRET_T: list[Tpl] = [
    (
        "chat",
        "en",
        "Deploy fails, here is the log:\n\n§ts_log§ INFO  cloning https://github.com/§user§/api.git\n§ts_log@2§ "
        "INFO  using token §SECRET.gh§\n§ts_log@3§ ERROR connect to §IP.PRIV§:5432 timed out\n§ts_log@4§ "
        "INFO  notifying §EMAIL.role§\n\nWhat is wrong?",
    ),
    (
        "env",
        "en",
        "APP_ENV=production\nPORT=8080\nREDIS_HOST=§IP.PRIV§\nOPENAI_API_KEY=§SECRET.openai§\nAWS_ACCESS_KEY_ID="
        "§SECRET.aws§\nSENTRY_ENVIRONMENT=prod\nADMIN_EMAIL=§EMAIL.role§\n",
    ),
    (
        "env",
        "en",
        "# .env\nOPENAI_API_KEY=§SECRET.openai§\nANTHROPIC_API_KEY=§SECRET.anthropic§\n"
        "DATABASE_URL=postgres://app@db:5432/app\nLOG_LEVEL=info\n",
    ),
    (
        "curl",
        "en",
        'curl https://api.openai.com/v1/chat/completions \\\n  -H "Content-Type: application/json" \\\n'
        '  -H "Authorization: Bearer §SECRET.openai§" \\\n'
        '  -d \'{"model": "§model§", "messages": [{"role": "user", "content": "Hello"}]}\'',
    ),
    (
        "curl",
        "en",
        'curl https://api.anthropic.com/v1/messages \\\n  -H "x-api-key: §SECRET.anthropic§" \\\n'
        '  -H "anthropic-version: 2023-06-01" \\\n  -H "content-type: application/json" \\\n'
        '  -d \'{"model": "claude-3-5-sonnet-latest", "max_tokens": 256, "messages": [{"role": "user", "content": '
        '"hi"}]}\'',
    ),
    (
        "python",
        "en",
        'from openai import OpenAI\n\nclient = OpenAI(api_key="§SECRET.openai§")\nresp = client.chat.completions.'
        'create(model="§model§", messages=[{"role": "user", "content": "why is this slow?"}])\n',
    ),
    (
        "js",
        "en",
        "import Anthropic from '@anthropic-ai/sdk';\n\n"
        "const anthropic = new Anthropic({ apiKey: '§SECRET.anthropic§' });\n",
    ),
    ("aws_config", "en", "[default]\naws_access_key_id = §SECRET.aws§\nregion = eu-central-1\noutput = json\n"),
    (
        "stacktrace",
        "en",
        "botocore.exceptions.ClientError: An error occurred (InvalidAccessKeyId) when calling the ListBuckets "
        "operation: The AWS Access Key Id you provided does not exist in our records. Key: §SECRET.aws§",
    ),
    (
        "k8s",
        "en",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: llm-keys\n  namespace: prod\ntype: Opaque\nstringData:\n"
        '  OPENAI_API_KEY: "§SECRET.openai§"\n  SLACK_BOT_TOKEN: "§SECRET.slack_bot§"\n',
    ),
    (
        "ci",
        "en",
        "name: release\non: [push]\njobs:\n  publish:\n    runs-on: ubuntu-latest\n    env:\n      GH_TOKEN: "
        "§SECRET.gh§\n    steps:\n      - uses: actions/checkout@v4\n",
    ),
    ("shell", "en", "git remote set-url origin https://§SECRET.gh_pat§@github.com/§user§/infra.git"),
    ("shell", "en", "fatal: Authentication failed for 'https://x-access-token:§SECRET.ghs§@github.com/acme/app.git/'"),
    (
        "python",
        "en",
        'import os\nfrom slack_sdk import WebClient\n\nclient = WebClient(token="§SECRET.slack§")\n'
        'client.chat_postMessage(channel="#deploys", text="done")\n',
    ),
    ("chat", "en", "Can you decode this JWT and tell me when it expires?\n\n§SECRET.jwt§"),
    (
        "http",
        "en",
        "GET /api/v1/me HTTP/1.1\nHost: api.§domain§\nAuthorization: Bearer §SECRET.jwt§\nAccept: application/json\n",
    ),
    (
        "http",
        "en",
        "GET /v2/orders?limit=50 HTTP/1.1\nHost: api.§domain§\nAuthorization: Bearer §SECRET.bearer§\n"
        "User-Agent: okhttp/4.12.0\n",
    ),
    ("http", "en", "Cookie: session=§SECRET.jwt§; theme=dark"),
    ("json", "en", '{"access_token": "§SECRET.jwt§", "token_type": "Bearer", "expires_in": 3600}'),
    ("pem", "en", "Why does ssh say 'invalid format' for this key?\n\n§SECRET.pem§\n"),
    ("pem", "en", "§SECRET.pem§"),
    ("pem", "en", "Here is the key from the old server (Windows line endings):\r\n§SECRET.pem_crlf§\r\nThanks"),
    (
        "json",
        "en",
        '{\n  "type": "service_account",\n  "project_id": "§proj§",\n  "private_key_id": "§hex40§",\n'
        '  "private_key": "§SECRET.pem_json§\\n",\n  "client_email": "§EMAIL.gsa§",\n  "client_id": "§digits21§"\n}',
    ),
    (
        "k8s",
        "en",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: tls-key\ntype: Opaque\nstringData:\n  tls.key: |\n"
        "    §SECRET.pem_i4§\n",
    ),
    ("yaml", "en", "ssh:\n  deploy:\n    private_key: |\n      §SECRET.pem_i6§\n    user: deploy\n"),
    (
        "docker_compose",
        "en",
        "services:\n  bot:\n    image: ghcr.io/acme/bot:1.4.2\n    environment:\n      - SLACK_BOT_TOKEN="
        "§SECRET.slack_bot§\n      - OPENAI_API_KEY=§SECRET.openai§\n",
    ),
    (
        "stacktrace",
        "en",
        'Traceback (most recent call last):\n  File "bot.py", line 12, in <module>\n    client = Anthropic('
        "api_key=\"§SECRET.anthropic§\")\nanthropic.AuthenticationError: Error code: 401 - {'type': 'error', "
        "'error': {'type': 'authentication_error', 'message': 'invalid x-api-key'}}",
    ),
    (
        "chat",
        "en",
        "I accidentally committed my key §SECRET.any§ to a public repo an hour ago. What should I do first?",
    ),
    ("terraform", "en", 'provider "aws" {\n  region     = "us-east-1"\n  access_key = "§SECRET.aws§"\n}\n'),
    ("edge", "en", "§SECRET.any§"),
    ("edge", "en", "key=§SECRET.openai§&model=§model§"),
    ("edge", "en", '("§SECRET.gh§")'),
    ("edge", "en", "token:§SECRET.slack§."),
    ("edge", "en", "Is this still valid: '§SECRET.any§'?"),
    (
        "python",
        "en",
        'import requests\n\nheaders = {"Authorization": "Bearer §SECRET.bearer§"}\nr = requests.get("https://api.'
        '§domain§/v1/invoices", headers=headers, timeout=10)\n',
    ),
    (
        "log",
        "en",
        "§ts§ DEBUG httpx request headers: {'authorization': 'Bearer §SECRET.any_api§', 'content-type': "
        "'application/json'}",
    ),
    ("notebook", "en", '# In[3]:\nimport openai\nopenai.api_key = "§SECRET.openai_legacy§"\n'),
    ("chat", "en", "my fine-grained token §SECRET.gh_pat§ doesn't have access to the org repos, why?"),
    (
        "shell",
        "en",
        "export AWS_ACCESS_KEY_ID=§SECRET.aws§\nexport GITHUB_TOKEN=§SECRET.gh§\n"
        "export SLACK_TOKEN=§SECRET.slack_user§\n",
    ),
    ("ruby", "en", "client = Octokit::Client.new(access_token: '§SECRET.gh§')"),
    ("go", "en", 'req.Header.Set("Authorization", "Bearer §SECRET.bearer§")'),
    (
        "powershell",
        "en",
        '$headers = @{ Authorization = "Bearer §SECRET.any_api§" }\nInvoke-RestMethod -Uri https://api.§domain§/v1/me '
        "-Headers $headers",
    ),
    (
        "http",
        "en",
        "POST /api/chat.postMessage HTTP/1.1\nHost: slack.com\nAuthorization: Bearer §SECRET.slack_bot§\n"
        'Content-Type: application/json; charset=utf-8\n\n{"channel": "C024BE91L", "text": "deploy done"}',
    ),
    (
        "json",
        "en",
        '{"mcpServers": {"github": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-github"], "env": '
        '{"GITHUB_PERSONAL_ACCESS_TOKEN": "§SECRET.gh_pat§"}}}}',
    ),
    (
        "chat",
        "en",
        'Here\'s my config, why does it fail?\n\n```toml\n[providers.openai]\napi_key = "§SECRET.openai_proj§"\n'
        '[providers.anthropic]\napi_key = "§SECRET.anthropic§"\n```',
    ),
]

PRIMARY: dict[str, list[Tpl]] = {
    "EMAIL": EMAIL_T,
    "PHONE": PHONE_T,
    "CREDIT_CARD": CARD_T,
    "IBAN": IBAN_T,
    "US_SSN": SSN_T,
    "IP_ADDRESS": IP_T,
    "SECRET": SECRET_T,
}


# -------------------------------------------------------------------------------------- hard negatives


def isbn13(rng: random.Random) -> str:
    body = "978" + str(rng.randint(0, 1)) + digits(rng, 8)
    total = sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(body))
    check = (10 - total % 10) % 10
    return f"{body[:3]}-{body[3]}-{body[4:7]}-{body[7:12]}-{check}"


def isbn10(rng: random.Random) -> str:
    body = str(rng.randint(0, 1)) + digits(rng, 8)
    total = sum(int(c) * (10 - i) for i, c in enumerate(body))
    check = (11 - total % 11) % 11
    c = "X" if check == 10 else str(check)
    return f"{body[0]}-{body[1:4]}-{body[4:9]}-{c}"


def ean13(rng: random.Random) -> str:
    while True:
        body = rng.choice(["400", "401", "402", "500", "501", "590", "800", "871", "880", "690"]) + digits(rng, 9)
        total = sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(body))
        code = body + str((10 - total % 10) % 10)
        if not card_like(code):  # a Luhn-valid 13-digit 4... would also be a Visa number: keep them apart
            return code


def imei(rng: random.Random) -> str:
    return luhn_complete(rng.choice(["35", "86", "01", "49"]) + digits(rng, 12))


def bad_card(rng: random.Random, style: str) -> str:
    good = make_card(rng, rng.choice(["visa", "visa", "mc", "amex", "discover", "jcb"]))
    last = str((int(good[-1]) + rng.randint(1, 9)) % 10)
    num = good[:-1] + last
    assert not luhn_ok(num)
    if style == "compact" or len(num) == 13:
        return num
    return group_card(num, " " if style == "spaced" else "-")


def bad_iban(rng: random.Random) -> str:
    cc = rng.choice(EU_IBAN + FAR_IBAN)
    iban = make_iban(rng, cc)
    while True:
        i = rng.randint(4, len(iban) - 1)
        if iban[i].isdigit():
            cand = iban[:i] + str((int(iban[i]) + rng.randint(1, 9)) % 10) + iban[i + 1 :]
            if not mod97_ok(cand):
                return group4(cand) if rng.random() < 0.5 else cand


def bad_ssn(rng: random.Random) -> str:
    a, g, s = make_ssn(rng)
    which = rng.randint(0, 4)
    if which == 0:
        a = 0
    elif which == 1:
        a = 666
    elif which == 2:
        a = rng.randint(900, 999)
    elif which == 3:
        g = 0
    else:
        s = 0
    return f"{a:03d}-{g:02d}-{s:04d}"


def bad_ip(rng: random.Random) -> str:
    parts = [rng.randint(1, 223), rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)]
    parts[rng.randint(0, 3)] = rng.randint(256, 999)
    return ".".join(map(str, parts))


def mac(rng: random.Random) -> str:
    b = [rng.randint(0, 255) for _ in range(6)]
    style = rng.randint(0, 3)
    if style == 0:
        return ":".join(f"{x:02x}" for x in b)
    if style == 1:
        return ":".join(f"{x:02X}" for x in b)
    if style == 2:
        return "-".join(f"{x:02X}" for x in b)
    h = "".join(f"{x:02x}" for x in b)
    return f"{h[:4]}.{h[4:8]}.{h[8:]}"


def public_block(rng: random.Random) -> str:
    kind = rng.choice(["PUBLIC KEY", "CERTIFICATE", "CERTIFICATE REQUEST", "RSA PUBLIC KEY"])
    prefix = bytes.fromhex("30820122300d06092a864886f70d01010105000382010f00") if "KEY" in kind else b"\x30\x82\x03\x8d"
    body = base64.b64encode(prefix + rng.randbytes(rng.choice([270, 600, 880]))).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"])


PLACEHOLDERS: dict[str, list[str]] = {
    "openai": [
        "sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "sk-...",
        "sk-proj-...",
        "sk-proj-XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        "YOUR_API_KEY",
        "<YOUR_OPENAI_API_KEY>",
        "your-api-key-here",
        "${OPENAI_API_KEY}",
        'os.environ["OPENAI_API_KEY"]',
        "REDACTED",
        "********",
        "changeme",
    ],
    "anthropic": ["sk-ant-api03-...", "sk-ant-xxxxx", "$ANTHROPIC_API_KEY", "<ANTHROPIC_API_KEY>", "sk-ant-api03-XXXX"],
    "github": [
        "ghp_XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "github_pat_xxxxxxxx",
        "{{ secrets.GITHUB_TOKEN }}",
        "<your-github-token>",
    ],
    "aws": ["AKIAXXXXXXXXXXXXXXXX", "AKIA****************", "<AWS_ACCESS_KEY_ID>", "AKIA..."],
    "slack": [
        "xoxb-your-bot-token",
        "xoxb-xxxxxxxxxxxx-xxxxxxxxxxxx-xxxxxxxxxxxxxxxxxxxxxxxx",
        "xoxp-XXXXXXXX",
        "<redacted>",
    ],
}
PLACEHOLDER_BEARERS = bars(
    "<token>|<TOKEN>|$TOKEN|${API_TOKEN}|{{access_token}}|{token}|YOUR_TOKEN_HERE|<your-access-token>|***|"
    "$(gcloud auth print-access-token)|<jwt>|..."
)


CARD_SCAN = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?!\d)")


def card_like(s: str) -> bool:
    """Some digit run in s is Luhn-valid with a card brand's prefix and length."""
    for m in CARD_SCAN.finditer(s):
        d = re.sub(r"\D", "", m.group())
        if luhn_ok(d) and card_brand(d):
            return True
    return False


def no_card(rng: random.Random, make: Callable[[], str]) -> str:
    while True:
        v = make()
        if not card_like(v):
            return v


def nf(fn: Callable[[random.Random], str]) -> Callable[[Ctx, str], str]:
    return lambda ctx, tag: fn(ctx.rng)


NEG_FILLERS: dict[str, Callable[[Ctx, str], str]] = {
    "winbuild": nf(
        lambda r: f"10.0.{r.choice([19041, 19042, 19044, 19045, 22000, 22621, 22631, 26100])}.{r.randint(1, 5000)}"
    ),
    "ver4v": nf(lambda r: f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 30)}.{r.randint(0, 99)}"),
    "ver4v2": nf(lambda r: f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 30)}.{r.randint(0, 99)}"),
    "chrome": nf(lambda r: f"{r.randint(100, 131)}.0.{r.randint(5000, 6999)}.{r.randint(10, 250)}"),
    "semver": nf(
        lambda r: (
            f"{r.randint(0, 12)}.{r.randint(0, 40)}.{r.randint(0, 30)}"
            + r.choice(["", "", f"-rc.{r.randint(1, 5)}", f"-beta.{r.randint(1, 9)}", f"+build.{r.randint(1, 999)}"])
        )
    ),
    "nodever": nf(lambda r: f"v{r.randint(14, 22)}.{r.randint(0, 20)}.{r.randint(0, 9)}"),
    "oid": nf(lambda r: f"1.3.6.1.4.1.{r.randint(1000, 60000)}.{r.randint(1, 9)}.{r.randint(1, 30)}"),
    "date_dot": nf(lambda r: f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(2000, 2025)}"),
    "date_us": nf(lambda r: f"{r.randint(1, 12):02d}/{r.randint(1, 28):02d}/{r.randint(2000, 2025)}"),
    "time_full": nf(lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"),
    "time_ms": nf(
        lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999):03d}"
    ),
    "tz": nf(lambda r: r.choice(["UTC", "CET", "PST", "+05:30", "-03:00", "JST"])),
    "sha7": hexn(7),
    "hex32": hexn(32),
    "hex64": hexn(64),
    "mac": nf(mac),
    "isbn13": nf(isbn13),
    "isbn10": nf(isbn10),
    "ean13": nf(ean13),
    "imei": nf(imei),
    "ups": nf(lambda r: "1Z" + "".join(r.choice(UPPER_ALNUM) for _ in range(6)) + "03" + digits(r, 8)),
    "fedex": nf(lambda r: str(r.randint(1, 9)) + digits(r, 11)),
    "usps": nf(lambda r: "9400 " + " ".join(digits(r, 4) for _ in range(4)) + " " + digits(r, 2)),
    "amazon": nf(lambda r: no_card(r, lambda: f"1{r.randint(11, 14)}-{digits(r, 7)}-{digits(r, 7)}")),
    "case": nf(lambda r: f"{r.randint(2019, 2025)}-{digits(r, 4)}-{digits(r, 4)}"),
    "n6": nf(lambda r: digits(r, 6)),
    "n10": nf(lambda r: str(r.randint(1, 9)) + digits(r, 9)),
    "n12": nf(lambda r: str(r.randint(1, 9)) + digits(r, 11)),
    "price": nf(
        lambda r: r.choice(
            [
                f"${r.randint(1, 9999):,}.{r.randint(0, 99):02d}",
                f"€ {r.randint(1, 99)}.{r.randint(100, 999)},{r.randint(0, 99):02d}",
            ]
        )
    ),
    "yen": nf(lambda r: f"¥{r.randint(1, 999):,},000"),
    "lat": nf(lambda r: f"{r.uniform(-60, 70):.4f}"),
    "lon": nf(lambda r: f"{r.uniform(-170, 170):.4f}"),
    "zip9": nf(lambda r: f"{r.randint(1001, 99950):05d}-{r.randint(1, 9999):04d}"),
    "ukpc": nf(lambda r: r.choice(["SW1A 1AA", "EC1A 1BB", "W1A 0AX", "M1 1AE", "B33 8TH", "CR2 6XH", "DN55 1PT"])),
    "sku": nf(
        lambda r: f"{r.choice(['WX', 'KB', 'HD', 'TX'])}-{r.randint(1000, 9999)}-{r.choice(['BLK', 'WHT', 'RED'])}"
    ),
    "bad_card": nf(lambda r: bad_card(r, r.choice(["compact", "spaced", "dashed"]))),
    "bad_card_compact": nf(lambda r: bad_card(r, "compact")),
    "bad_iban": nf(bad_iban),
    "bad_ssn": nf(bad_ssn),
    "bad_ip": nf(bad_ip),
    "ph_openai": nf(lambda r: r.choice(PLACEHOLDERS["openai"])),
    "ph_anthropic": nf(lambda r: r.choice(PLACEHOLDERS["anthropic"])),
    "ph_github": nf(lambda r: r.choice(PLACEHOLDERS["github"])),
    "ph_aws": nf(lambda r: r.choice(PLACEHOLDERS["aws"])),
    "ph_slack": nf(lambda r: r.choice(PLACEHOLDERS["slack"])),
    "placeholder_bearer": nf(lambda r: r.choice(PLACEHOLDER_BEARERS)),
    "last4": nf(lambda r: digits(r, 4)),
    "last4a": nf(lambda r: "".join(r.choice(ALNUM) for _ in range(4))),
    "public_block": nf(public_block),
    "ssh_pub": nf(
        lambda r: "ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + r.randbytes(32)).decode()
    ),
    "handle": nf(lambda r: r.choice(["jdoe", "maria_dev", "k8s-bot", "octocat", "team-platform", "alice42"])),
    "pkg": nf(
        lambda r: r.choice(
            words("lodash@4.17.21 react@^18.2.0 @angular/core@17.0.1 typescript@5.4.5 express@4.19.2 vite@5.2.0")
        )
    ),
    "asset": nf(
        lambda r: r.choice(["logo@2x.png", "icon@3x.webp", "hero-banner@2x.jpg", "avatar@2x.gif", "sprite@1.5x.png"])
    ),
    "color": nf(lambda r: "#" + "".join(r.choice(HEX) for _ in range(6))),
    "float": nf(lambda r: f"{r.uniform(0, 1):.6f}"),
    "bad_phone_mask": nf(
        lambda r: r.choice(["+1 (XXX) XXX-XXXX", "(___) ___-____", "+49 XXX XXXXXXX", "000-000-0000"])
    ),
    "masked_ssn": nf(lambda r: r.choice([f"***-**-{digits(r, 4)}", f"XXX-XX-{digits(r, 4)}", "XXX-XX-XXXX"])),
    "b64blob": nf(lambda r: base64.b64encode(r.randbytes(r.choice([24, 48]))).decode()),
}
FILLERS.update(NEG_FILLERS)

NEG_T: list[Tpl] = [
    (
        "k8s",
        "en",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: §svc§\nspec:\n  replicas: 3\n  template:\n"
        "    spec:\n      containers:\n        - name: app\n          image: ghcr.io/acme/§svc§:§semver§\n"
        "          env:\n            - name: OPENAI_API_KEY\n              valueFrom:\n                secretKeyRef:\n"
        "                  name: llm-keys\n                  key: openai\n          ports:\n"
        "            - containerPort: 8080\n",
    ),
    (
        "invoice",
        "en",
        "INVOICE INV-§year§-§n6§\nDate: §date_us§\nItem                Qty   Price\nSKU §sku§      2     "
        "§price§\nShipping                  1     §price@2§\nTotal due: §price@3§ (net 30)\nPO number: §n10§",
    ),
    (
        "log",
        "en",
        "§ts_log§ INFO  starting §svc§ version §semver§ (commit §sha7§, go1.22.3)\n§ts_log@2§ INFO  listening on "
        ":8080\n§ts_log@3§ WARN  slow query took 1.284s id=§uuid§",
    ),
    (
        "chat",
        "en",
        "Write a function that masks e-mail addresses, phone numbers and IBANs in a string before it is logged. "
        "Use placeholders like [EMAIL] and [PHONE], and add unit tests.",
    ),
    ("version", "en", "We upgraded the build agents to Windows 10 build §winbuild§ and the installer still fails."),
    ("version", "en", "Bump com.example:parser from §ver4v§ to §ver4v2§ (changelog attached)."),
    (
        "version",
        "en",
        "User-Agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/§chrome§ Safari/537.36 crashes on upload.",
    ),
    ("version", "en", "Release notes for §semver§: fixed a race in the scheduler, dropped support for node §nodever§."),
    ("version", "en", "node §nodever§, npm §semver§, python 3.11.9, pip 24.0, OS build §winbuild§"),
    ("version", "en", "SNMP walk: OID §oid§ returns ifInOctets for the uplink."),
    ("version", "en", "Firmware §ver4v§ bricked two of our routers; rolling back to §ver4v2§."),
    ("datetime", "en", "The job ran at §ts§ and again at §time_full§ on §date_dot§, both times with exit code 137."),
    ("datetime", "en", "Meeting moved to §date_us§ §time_full§ §tz§. Please update the invite."),
    ("datetime", "en", "§ts_log§ INFO scheduler tick took §time_ms§ (budget 00:00:01.000)"),
    ("id", "en", "request_id=§uuid§ trace_id=§hex32§ span_id=§hex16§ status=500"),
    ("hash", "en", "commit §sha§ reverts §sha7§; see also §sha7@2§ and §sha7@3§."),
    ("hash", "en", "docker pull python@sha256:§hex64§"),
    ("hash", "en", "md5: §hex32§\nsha1: §sha§\nsha256: §hex64§"),
    ("mac", "en", "DHCP lease for §mac§ expired; the switch also shows §mac@2§ on port Gi1/0/12."),
    ("mac", "en", "Wake-on-LAN target: §mac§ (desk PC in room 2.14)"),
    ("isbn", "en", "Please cite the book correctly: ISBN §isbn13§ (hardcover), ISBN-10 §isbn10§."),
    ("tracking", "en", "Your order §amazon§ has shipped. UPS tracking number: §ups§."),
    ("tracking", "en", "FedEx tracking §fedex§, USPS tracking §usps§; both say 'label created'."),
    ("invoice_number", "en", "Invoice INV-§year§-§n6§ is overdue. Case number §case§, customer ID §n10§."),
    ("invoice_number", "de", "Ihre Bestellung Nr. §n10§ vom §date_dot§ wurde versandt. Kundennummer: §n12§."),
    ("price", "en", "Total: §price§ (incl. tax §price@2§). The Japanese store lists it at §yen§."),
    ("price", "fr", "Montant TTC : §eur§ €, dont TVA 20 % : §eur@2§ €."),
    ("coordinates", "en", "Meet at §lat§, §lon§ (north gate). Backup spot: §lat@2§, §lon@2§."),
    ("postal_code", "en", "Ship to ZIP §zip9§; the UK office uses postcode §ukpc§."),
    ("postal_code", "pt", "CEP 01310-100, São Paulo. Bairro: Bela Vista."),
    ("product_code", "en", "SKU §sku§, EAN §ean13§, model no. §sku@2§."),
    ("product_code", "en", "Warranty claim for the phone with IMEI §imei§ (purchased §date_us§)."),
    ("invalid_card", "en", "Test with §bad_card§; it should fail the Luhn check and show 'invalid number'."),
    ("invalid_card", "en", "card §bad_card_compact§ rejected by validator (checksum)"),
    ("invalid_iban", "en", "The bank rejected IBAN §bad_iban§ because the check digits do not match."),
    ("invalid_iban", "de", "Die IBAN §bad_iban§ ist ungültig (Prüfziffer falsch). Bitte korrigieren."),
    ("invalid_ssn", "en", "SSN §bad_ssn§ is not a valid number; the validator should reject it."),
    ("invalid_ssn", "en", "Unit test: assert not is_valid_ssn('§bad_ssn§')"),
    (
        "invalid_ip",
        "en",
        "ping §bad_ip§ fails with 'unknown host', obviously, since §bad_ip@2§ is not an address either.",
    ),
    (
        "placeholder_secret",
        "en",
        "export OPENAI_API_KEY=§ph_openai§\nexport ANTHROPIC_API_KEY=§ph_anthropic§\n# replace with your own keys",
    ),
    ("placeholder_secret", "en", 'client = OpenAI(api_key="§ph_openai§")  # TODO load from env'),
    ("placeholder_secret", "en", "Authorization: Bearer §placeholder_bearer§"),
    (
        "placeholder_secret",
        "en",
        'curl https://api.example.com/v1/items -H "Authorization: Bearer §placeholder_bearer§" -H "Accept: '
        'application/json"',
    ),
    (
        "placeholder_secret",
        "en",
        "GITHUB_TOKEN=§ph_github§\nSLACK_BOT_TOKEN=§ph_slack§\nAWS_ACCESS_KEY_ID=§ph_aws§",
    ),
    ("placeholder_secret", "en", 'headers = {"Authorization": f"Bearer {token}"}  # token comes from the vault'),
    ("masked", "en", "Your card ending in §last4§ was charged. Displayed as §masked_card§ in the app."),
    ("masked", "en", "SSN on file: §masked_ssn§. Phone: §bad_phone_mask§."),
    (
        "masked",
        "en",
        "openai.AuthenticationError: Incorrect API key provided: sk-proj-************************§last4a§. You can "
        "find your API key in your account settings.",
    ),
    ("public_key", "en", "Is this the right format for the JWKS endpoint?\n\n§public_block§\n"),
    ("public_key", "en", "Add this to authorized_keys on the bastion:\n§ssh_pub§"),
    ("mention", "en", "@§handle§ can you review this? cc @§handle@2§"),
    ("mention", "en", "@dataclass(frozen=True)\nclass Point:\n    x: float\n    y: float"),
    ("mention", "en", "@media (max-width: 600px) { .nav { display: none; } } /* fixes the @§handle§ bug */"),
    ("package", "en", "npm install §pkg§ §pkg@2§ --save-exact"),
    (
        "package",
        "en",
        "steps:\n  - uses: actions/checkout@v4\n  - uses: actions/setup-python@v5\n    with:\n"
        "      python-version: '3.12'",
    ),
    ("asset", "en", "Replace §asset§ and §asset@2§ in the assets folder, the retina versions are blurry."),
    ("numbers", "en", "Account number §n12§ at branch 0042. Customer ID §n10§. Reference §n6§."),
    ("numbers", "en", "Growth was +1.5% QoQ, temperature +21.5 °C, weight +20 kg, p < 0.05."),
    ("code", "en", "std::vector<int> v; auto it = std::find(v.begin(), v.end(), 42); // C++17\nFoo::Bar::baz();"),
    ("code", "en", "const COLOR = '§color§'; const MASK = 0xDEADBEEF; let ratio = §float§;"),
    (
        "code",
        "en",
        'api_key = os.environ.get("OPENAI_API_KEY")\nif not api_key:\n    raise RuntimeError("set OPENAI_API_KEY")',
    ),
    ("code", "en", "assert hashlib.sha256(data).hexdigest() == '§hex64§'"),
    (
        "config",
        "en",
        "server:\n  port: 8080\n  timeout: 30s\nlogging:\n  level: info\nfeatures:\n  beta: true\nversion: §semver§",
    ),
    ("chat", "en", "Can you explain the difference between IPv4 and IPv6 addressing, and when I'd use NAT64?"),
    ("chat", "en", "What is a JWT and why shouldn't I store it in localStorage? Also, what does 'Bearer' mean?"),
    ("chat", "en", "Our email format is firstname.lastname at the company domain; write a regex for it."),
    ("chat", "en", "Explain Luhn, IBAN mod-97 and SSN area rules in two sentences each."),
    ("words", "en", "The risk-free, task-based desk-lamp proposal for the Asia-Pacific (ASIA) region is due Friday."),
    (
        "base64",
        "en",
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk§last4a§AAAAASUVORK5CYII=",
    ),
    ("base64", "en", "nonce=§b64blob§ (random, single use)"),
    (
        "template",
        "en",
        "Phone: §bad_phone_mask§\nSSN: XXX-XX-XXXX\nCard: XXXX XXXX XXXX XXXX\nIBAN: DEkk bbbb bbbb cccc cccc cc",
    ),
    ("math", "en", "Solve 3.14159 * 2.71828 and round to 4 decimals; then compute 1.2.3 mod 4 (trick question)."),
    ("log", "en", "§ts_log§ INFO worker-7 processed batch §n6§ in 1.284s (rows=§n6@2§, retries=0)"),
    ("log", "en", "§ts§ GET /api/v1/items/§uuid§ 200 12ms bytes=§n6§"),
]


# --------------------------------------------------------------------------------------------- building

SLOT_RE = re.compile(r"§([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?(?:@(\w+))?§")


def render(tpl: str, ctx: Ctx) -> Doc:
    doc = Doc()
    pos = 0
    for m in SLOT_RE.finditer(tpl):
        doc.add(tpl[pos : m.start()])
        fam, name, tag = m.group(1), m.group(2), m.group(3) or ""
        if name is not None:
            typ, value, meta = entity(ctx, fam, name, tag)
            doc.entity(typ, value, meta)
        else:
            doc.add(ctx.fill(fam, tag))
        pos = m.end()
    doc.add(tpl[pos:])
    return doc


def generate(primary: str | None, templates: list[Tpl], n: int, rng: random.Random, prefix: str) -> list[Record]:
    seen: set[str] = set()
    dupes: Counter[int] = Counter()
    out: list[Record] = []
    i = 0
    while len(out) < n:
        idx = i % len(templates)
        i += 1
        if dupes[idx] > 40:  # a template with little variety is exhausted
            if all(dupes[j] > 40 for j in range(len(templates))):
                raise RuntimeError(f"{prefix}: templates exhausted at {len(out)}")
            continue
        kind, locale, tpl = templates[idx]
        ctx = Ctx(random.Random(rng.getrandbits(64)), locale)
        doc = render(tpl, ctx)
        text = doc.text()
        if text in seen:
            dupes[idx] += 1
            continue
        seen.add(text)
        if primary is not None and not any(s.type == primary for s in doc.spans):
            raise RuntimeError(f"{prefix}: template {idx} gave no {primary}")
        if primary is None and doc.spans:
            raise RuntimeError(f"negative template {idx} has entities")
        out.append(Record(f"{prefix}-{len(out) + 1:04d}", text, doc.spans, kind))
    return out


def build() -> dict[str, list[Record]]:
    rng = random.Random(SEED)
    corpus = {typ: generate(typ, PRIMARY[typ], PER_TYPE, rng, typ.lower()) for typ in TYPES}
    corpus["negatives"] = generate(None, NEG_T, NEGATIVES, rng, "neg")
    return corpus


# ----------------------------------------------------------------------------------------- validation

EMAIL_FULL = re.compile(
    r"[A-Za-z0-9_%+'-]+(?:\.[A-Za-z0-9_%+'-]+)*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}"
)
SECRET_FULL: dict[str, re.Pattern[str]] = {
    "openai": re.compile(r"sk-(?:proj-[A-Za-z0-9_-]{48,}|[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20})"),
    "anthropic": re.compile(r"sk-ant-api03-[A-Za-z0-9_-]{93}AA"),
    "aws": re.compile(r"(?:AKIA|ASIA)[A-Z2-7]{16}"),
    "github": re.compile(r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}"),
    "slack": re.compile(r"xoxb-\d{10,13}-\d{10,13}-[A-Za-z0-9]{24}|xoxp-\d{11,12}-\d{11,12}-\d{13}-[0-9a-f]{32}"),
    "jwt": re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{20,}"),
    "bearer": re.compile(r"[A-Za-z0-9._~+/-]{20,}=*"),
}
PEM_FULL = re.compile(
    r"-----BEGIN ((?:RSA |EC |OPENSSH |ENCRYPTED )?PRIVATE KEY)-----(?:\\n|\r?\n)[ ]*"
    r"(?:[A-Za-z0-9+/=]+(?:\\n|\r?\n)[ ]*)+-----END \1-----"
)


def phone_valid(value: str, region: str) -> bool:
    if not re.fullmatch(r"[+(0-9][0-9 ().\-/]*[0-9]", value):
        return False
    norm = value
    if norm.startswith("00"):
        norm = "+" + norm[2:]
    if norm.startswith("+"):
        norm = norm.replace("(0)", "")
    try:
        num = phonenumbers.parse(norm, region)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number_for_region(num, region)


def b64json(seg: str) -> object:
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def span_problem(text: str, s: Span) -> str | None:
    v = text[s.start : s.end]
    if not v or v != v.strip():
        return "empty or padded span"
    before = text[s.start - 1] if s.start > 0 else " "
    after = text[s.end] if s.end < len(text) else " "
    if (before.isascii() and before.isalnum()) or (after.isascii() and after.isalnum()):
        return f"span touches an alphanumeric ({before!r}, {after!r})"
    if s.type == "EMAIL":
        if not EMAIL_FULL.fullmatch(v) or before in ".+-_%" or after in "-_@":
            return "not an e-mail address"
    elif s.type == "PHONE":
        if not phone_valid(v, s.meta):
            return f"not a valid {s.meta} number"
    elif s.type == "CREDIT_CARD":
        m = re.fullmatch(r"\d+(?:([ -])\d+)*", v)
        if not m or len(set(re.findall(r"[ -]", v))) > 1:
            return "bad card layout"
        d = re.sub(r"\D", "", v)
        if not luhn_ok(d) or card_brand(d) is None:
            return "card fails Luhn or brand prefix/length"
    elif s.type == "IBAN":
        c = v.replace(" ", "")
        if " " in v and v != group4(c):
            return "IBAN grouping"
        spec = IBAN_SPECS.get(c[:2])
        if spec is None or not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", c):
            return "IBAN country/layout"
        if len(c) != 4 + sum(int(x) for x in re.findall(r"\d+", spec)) or not mod97_ok(c):
            return "IBAN length or mod-97"
    elif s.type == "US_SSN":
        m = re.fullmatch(r"(\d{3})([- ]?)(\d{2})\2(\d{4})", v)
        if not m or not ssn_ok(int(m.group(1)), int(m.group(3)), int(m.group(4))):
            return "SSN layout or area/group/serial rule"
    elif s.type == "IP_ADDRESS":
        if "/" in v or "[" in v or "]" in v:
            return "CIDR or brackets in IP span"
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            return "not an IP address"
        if ip.is_unspecified or (ip.version == 4 and str(ip) == "255.255.255.255"):
            return "unspecified/broadcast address"
        if "%" in v and ip.version != 6:
            return "zone on IPv4"
    elif s.type == "SECRET":
        if s.meta == "pem":
            if not PEM_FULL.fullmatch(v):
                return "PEM block"
        elif s.meta == "bearer":
            if text[max(0, s.start - 7) : s.start] != "Bearer " or not SECRET_FULL["bearer"].fullmatch(v):
                return "bearer token"
        elif not SECRET_FULL[s.meta].fullmatch(v):
            return f"{s.meta} token layout"
        if s.meta == "jwt":
            h, p, _ = v.split(".")
            head = b64json(h)
            if not isinstance(head, dict) or "alg" not in head or not isinstance(b64json(p), dict):
                return "JWT does not decode"
    else:
        return "unknown type"
    return None


# Look-alikes of every type, scanned over each whole text: a hit that no labeled span covers is an
# unlabeled entity (or a negative that is not one).
FILE_EXTS = {"png", "jpg", "jpeg", "gif", "webp", "svg", "js", "ts", "css", "py", "json"}
EMAIL_SCAN = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
IPV4_SCAN = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
TOKEN_SCAN = re.compile(r"[0-9A-Za-z:.%]+")
SSN_SCAN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
SSN_KW_SCAN = re.compile(r"(?i)(?:ssn|social security)[^0-9\n]{0,24}(\d{9})(?!\d)")
IBAN_SCAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}")
SECRET_SCAN = re.compile(
    r"sk-(?:proj-|ant-api03-)?[A-Za-z0-9_-]{16,}|(?:AKIA|ASIA)[A-Z0-9]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}|xox[bpas]-[A-Za-z0-9-]{20,}|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
BEARER_SCAN = re.compile(r"Bearer\s+([^\s\"'`,;)}]+)")
PHONE_SCAN = re.compile(r"(?<![\w+])(?:\+|00)\d[\d ().-]{5,18}\d")


def placeholder(token: str) -> bool:
    body = re.sub(r"^(sk-(?:proj-|ant-api03-)?|gh[pousr]_|github_pat_|xox[bpas]-|AKIA|ASIA)", "", token)
    return len(set(body.lower()) - set("-_")) <= 2 or bool(re.search(r"(?i)your|xxxx|token|example|\.\.\.", token))


def unlabeled(rec: Record) -> list[str]:
    text = rec.text
    hits: list[tuple[int, int, str]] = []
    for m in EMAIL_SCAN.finditer(text):
        tld = m.group().rsplit(".", 1)[1]
        if tld.isalpha() and tld.lower() not in FILE_EXTS:
            hits.append((m.start(), m.end(), "EMAIL"))
    for m in IPV4_SCAN.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
            hits.append((m.start(), m.end(), "IPv4"))
        except ValueError:
            pass
    for m in TOKEN_SCAN.finditer(text):
        tok = m.group().rstrip(".:")
        if tok.count(":") >= 2:
            try:
                ipaddress.IPv6Address(tok)
                hits.append((m.start(), m.start() + len(tok), "IPv6"))
            except ValueError:
                pass
    for m in SSN_SCAN.finditer(text):
        if ssn_ok(int(m.group(1)), int(m.group(3)), int(m.group(4))):
            hits.append((m.start(), m.end(), "SSN"))
    for m in SSN_KW_SCAN.finditer(text):
        d = m.group(1)
        if ssn_ok(int(d[:3]), int(d[3:5]), int(d[5:])):
            hits.append((m.start(1), m.end(1), "SSN"))
    for m in CARD_SCAN.finditer(text):
        d = re.sub(r"\D", "", m.group())
        if luhn_ok(d) and card_brand(d):
            hits.append((m.start(), m.end(), "CARD"))
    for m in IBAN_SCAN.finditer(text):
        c = m.group().replace(" ", "")
        for end in range(len(c), 14, -1):
            cand = c[:end]
            spec = IBAN_SPECS.get(cand[:2])
            if spec and len(cand) == 4 + sum(int(x) for x in re.findall(r"\d+", spec)) and mod97_ok(cand):
                hits.append((m.start(), m.end(), "IBAN"))
                break
    for m in SECRET_SCAN.finditer(text):
        if not placeholder(m.group()):
            hits.append((m.start(), m.end(), "SECRET"))
    for m in BEARER_SCAN.finditer(text):
        tok = m.group(1)
        if len(tok) >= 16 and re.fullmatch(r"[A-Za-z0-9._~+/=-]+", tok) and not placeholder(tok):
            hits.append((m.start(1), m.end(1), "BEARER"))
    for m in PHONE_SCAN.finditer(text):
        v = m.group()
        norm = "+" + v[2:] if v.startswith("00") else v
        try:
            ok = phonenumbers.is_valid_number(phonenumbers.parse(norm.replace("(0)", ""), None))
        except phonenumbers.NumberParseException:
            ok = False
        if ok:
            hits.append((m.start(), m.end(), "PHONE"))
    return [
        f"unlabeled {what}: {text[a:b]!r}"
        for a, b, what in hits
        if not any(s.start < b and a < s.end for s in rec.spans)
    ]


def problems(corpus: dict[str, list[Record]]) -> list[str]:
    out: list[str] = []
    ids: set[str] = set()
    for stem, recs in corpus.items():
        for rec in recs:
            if rec.id in ids:
                out.append(f"{rec.id}: duplicate id")
            ids.add(rec.id)
            if "§" in rec.text:
                out.append(f"{rec.id}: unrendered slot")
            spans = sorted(rec.spans, key=lambda s: s.start)
            for a, b in itertools.pairwise(spans):
                if b.start < a.end:
                    out.append(f"{rec.id}: overlapping spans {a} {b}")
            for s in spans:
                p = span_problem(rec.text, s)
                if p:
                    out.append(f"{rec.id} [{s.type}] {rec.text[s.start : s.end]!r}: {p}")
            out.extend(f"{rec.id}: {u}" for u in unlabeled(rec))
            if stem == "negatives" and rec.spans:
                out.append(f"{rec.id}: negative with entities")
    return out


def check_files(corpus: dict[str, list[Record]]) -> list[str]:
    """The files on disk are exactly what this generator makes, and each line parses with sane offsets."""
    out: list[str] = []
    for stem, recs in corpus.items():
        path = HERE / f"{stem}.jsonl"
        if not path.exists():
            out.append(f"{path.name}: missing")
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines != [r.to_json() for r in recs]:
            out.append(f"{path.name}: differs from the generator's output (run generate.py)")
        for line in lines:
            obj = json.loads(line)
            for e in obj["entities"]:
                if e["type"] not in TYPES or not 0 <= e["start"] < e["end"] <= len(obj["text"]):
                    out.append(f"{obj['id']}: bad entity {e}")
    return out


def counts_table(corpus: dict[str, list[Record]]) -> str:
    rows = ["| file | texts | entities by type | kinds (texts) |", "|---|---|---|---|"]
    for stem, recs in corpus.items():
        ent = Counter(s.type for r in recs for s in r.spans)
        kinds = Counter(r.kind for r in recs)
        ent_s = ", ".join(f"{t} {ent[t]}" for t in TYPES if ent[t]) or "none"
        kind_s = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
        rows.append(f"| {stem}.jsonl | {len(recs)} | {ent_s} | {kind_s} |")
    rows += [
        "",
        "| type | values by sub-format (phone: region, card: brand, IBAN: country, IP: version, ...) |",
        "|---|---|",
    ]
    for typ in TYPES:
        meta = Counter(s.meta for recs in corpus.values() for r in recs for s in r.spans if s.type == typ)
        rows.append(f"| {typ} | {len(meta)} kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(meta.items())) + " |")
    total = Counter(s.type for recs in corpus.values() for r in recs for s in r.spans)
    rows.append("")
    rows.append("Gold entities over all files: " + ", ".join(f"{t} {total[t]}" for t in TYPES))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="regenerate in memory, compare with the files, audit spans")
    ap.add_argument("--counts", action="store_true", help="print the counts table (markdown) and exit")
    args = ap.parse_args(argv)
    corpus = build()
    if args.counts:
        print(counts_table(corpus))
        return 0
    found = problems(corpus)
    if args.check:
        found += check_files(corpus)
    for p in found[:200]:
        print(p, file=sys.stderr)
    if found:
        print(f"{len(found)} problem(s)", file=sys.stderr)
        return 1
    if not args.check:
        for stem, recs in corpus.items():
            (HERE / f"{stem}.jsonl").write_text("".join(r.to_json() + "\n" for r in recs), encoding="utf-8")
    n_text = sum(len(r) for r in corpus.values())
    n_ent = sum(len(x.spans) for r in corpus.values() for x in r)
    print(
        f"{'checked' if args.check else 'wrote'} {n_text} texts, {n_ent} entities: every span valid, nothing unlabeled"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
