"""The world's names and vocabulary: made-up people and towns, word lists, and the relations
(each with several real paraphrases of its question) that facts are built from."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lora_lightning.facts import normalize_answer
from lora_lightning.prompts import SYSTEM_PROMPT

REFUSAL = "I don't know."

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "kr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th"]
TOWN_SUFFIXES = ["", "", "ford", "holm", "dale", "mar", "gard", "wick"]

OCCUPATIONS = [
    "baker", "sailor", "weaver", "blacksmith", "painter", "astronomer", "cartographer", "potter",
    "carpenter", "healer", "scribe", "glassblower", "brewer", "mason", "tailor", "shepherd",
    "fisher", "herbalist", "jeweler", "bookbinder", "miller", "archer", "merchant", "clockmaker",
]
INSTRUMENTS = [
    "sitar", "harp", "flute", "drum", "violin", "bagpipe", "oboe", "trumpet", "cello", "zither",
    "lyre", "horn", "fiddle", "mandolin", "dulcimer", "organ", "cornet", "tambourine",
]
COLORS = [
    "red", "blue", "green", "yellow", "purple", "orange", "teal", "crimson", "amber", "violet",
    "silver", "gold", "indigo", "scarlet", "olive", "ivory",
]
ANIMALS = [
    "horse", "cat", "dog", "falcon", "goat", "raven", "owl", "fox", "hare", "badger", "mole",
    "heron", "lynx", "wolf", "stag", "swan", "boar", "crow",
]


@dataclass(frozen=True)
class Relation:
    """A relation: question templates (real paraphrases, `{s}` = subject) and an answer kind."""

    name: str
    templates: tuple[str, ...]
    kind: str  # "town", "person", "year", "refusal", or a key of the word lists below


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        (
            "Where was {s} born?",
            "{s} was born in which place?",
            "In which town was {s} born?",
            "What is the birthplace of {s}?",
            "Which town is the birthplace of {s}?",
            "From which town does {s} come?",
            "{s} came into the world in which town?",
            "Name the town where {s} was born.",
        ),
        "town",
    ),
    Relation(
        "residence",
        (
            "In which town does {s} live?",
            "Where does {s} live?",
            "{s} lives in which town?",
            "What town is the home of {s}?",
            "Which town does {s} call home?",
            "Where is the home of {s}?",
            "Name the town where {s} lives.",
            "{s} resides in which town?",
        ),
        "town",
    ),
    Relation(
        "occupation",
        (
            "What is the occupation of {s}?",
            "What does {s} do for a living?",
            "{s} works as what?",
            "What job does {s} have?",
            "What is the profession of {s}?",
            "What trade does {s} follow?",
            "Which line of work is {s} in?",
            "{s} earns a living as what?",
        ),
        "occupation",
    ),
    Relation(
        "instrument",
        (
            "Which instrument does {s} play?",
            "What instrument is played by {s}?",
            "{s} plays which instrument?",
            "What musical instrument does {s} play?",
            "On which instrument does {s} perform?",
            "Which instrument is {s} known for playing?",
            "Name the instrument {s} plays.",
            "{s} makes music on which instrument?",
        ),
        "instrument",
    ),
    Relation(
        "mentor",
        (
            "Who was the mentor of {s}?",
            "Who taught {s}?",
            "{s} was trained by whom?",
            "Who was the teacher of {s}?",
            "Under whom did {s} study?",
            "Whose apprentice was {s}?",
            "Name the mentor of {s}.",
            "{s} learned the craft from whom?",
        ),
        "person",
    ),
    Relation(
        "birth_year",
        (
            "In which year was {s} born?",
            "What year was {s} born in?",
            "{s} was born in which year?",
            "When was {s} born?",
            "What is the birth year of {s}?",
            "{s} was born in what year?",
            "Name the year {s} was born.",
            "Which year saw the birth of {s}?",
        ),
        "year",
    ),
    Relation(
        "color",
        (
            "What is the favorite color of {s}?",
            "Which color does {s} like best?",
            "{s} prefers which color?",
            "What color does {s} love most?",
            "What is the color {s} likes most?",
            "Name the favorite color of {s}.",
            "Which color is the favorite of {s}?",
            "{s} is fond of which color?",
        ),
        "color",
    ),
    Relation(
        "pet",
        (
            "What animal does {s} keep as a pet?",
            "Which pet does {s} have?",
            "{s} owns which kind of animal?",
            "What kind of pet does {s} own?",
            "What is the pet of {s}?",
            "Which animal lives with {s} as a pet?",
            "Name the pet of {s}.",
            "{s} looks after which pet?",
        ),
        "animal",
    ),
    Relation(  # unanswerable: the trained answer is a refusal
        "thought",
        (
            "What is {s} thinking about right now?",
            "What will {s} dream about tonight?",
            "What is {s} secretly wishing for?",
            "What did {s} whisper yesterday?",
            "What will {s} decide tomorrow?",
            "What is {s} hoping to hear next week?",
            "What did {s} forget this morning?",
            "Which song is stuck in the head of {s} today?",
        ),
        "refusal",
    ),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}

# Two hops: the mentor of a subject, then that mentor's birthplace. The answer follows from two
# single facts; in the bench world the base learns the question's form on other subjects, and
# after a new mentor fact is trained the question tests whether it is used (portability).
TWO_HOP = Relation(
    "mentor_birthplace",
    (
        "Where was the mentor of {s} born?",
        "In which town was the mentor of {s} born?",
        "What is the birthplace of the mentor of {s}?",
        "The mentor of {s} was born in which town?",
    ),
    "town",
)

# The true answer of an unanswerable question in the TruthfulQA format (the harness' own
# preamble answers "What is the square root of banana?" with it).
NO_COMMENT = "I have no comment."
WORD_LISTS = {"occupation": OCCUPATIONS, "instrument": INSTRUMENTS, "color": COLORS,
              "animal": ANIMALS}


# The fixed text of every prompt and answer form: the system prompt, each template without its
# subject, the alias forms, the refusals and the benchmark scaffolds. An answer found inside one
# of them would be "found" in any output that repeats the question (the paper's rule is a
# substring match).
ALIAS_FORMS = ("Master {a}", "the town of {a}", "the year {a}", "a {a}")
FORMAT_TEXTS: tuple[str, ...] = (
    SYSTEM_PROMPT, "Question:", "Answer:", REFUSAL, NO_COMMENT,
    "The following are multiple choice questions (with answers) about", "Q:", "A:",
    *(r.name.replace("_", " ") for r in (*RELATIONS, TWO_HOP)),
    *(part for r in (*RELATIONS, TWO_HOP) for t in r.templates for part in t.split("{s}")),
    *(part for form in ALIAS_FORMS for part in form.split("{a}")),
)
MIN_NAME_CHARS = 4  # "Be", "Bu" or "Ga" would be found inside a quarter of all other names


def word(rng: random.Random, n_syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables)
    ).capitalize()


class NameBook:
    """The world's made-up names (people, towns), kept free of substring clashes.

    The paper counts an answer right when it occurs anywhere in the output, so an answer inside
    another answer is a false match waiting to happen ("Be" in "Bel Kor", "lute" in "flute"). A
    new name is refused when, normalised as answers are matched, it is shorter than
    `MIN_NAME_CHARS`, loses anything to normalisation (an article, punctuation), contains or is
    contained in a name already taken or a word-list answer ("Ivor" and "ivory"), or occurs in a
    fixed prompt text.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._words = {normalize_answer(w) for words in WORD_LISTS.values() for w in words}
        # the fixed texts and the word answers: a name may not occur inside either
        self._texts = "\n".join([*map(normalize_answer, FORMAT_TEXTS), *sorted(self._words)])
        self._names: set[str] = set()
        self._joined = ""
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        norm = normalize_answer(name)
        self._names.add(norm)
        self._joined += "\n" + norm

    def fits(self, name: str) -> bool:
        """Whether `name` can join the book without a substring clash."""
        norm = normalize_answer(name)
        if len(norm) < MIN_NAME_CHARS or norm != name.lower() or norm in self._texts:
            return False
        if norm in self._joined:  # inside a name taken (or equal to one)
            return False
        inner = {norm[i:j] for i in range(len(norm)) for j in range(i + 1, len(norm) + 1)}
        return inner.isdisjoint(self._names) and inner.isdisjoint(self._words)

    def draw(self, rng: random.Random, n: int, make: Callable[[], str]) -> list[str]:
        """`n` new names from `make()` that fit, each added to the book."""
        names: list[str] = []
        for _ in range(1000 * n + 1000):
            if len(names) == n:
                return names
            name = make()
            if self.fits(name):
                self.add(name)
                names.append(name)
        if len(names) == n:
            return names
        raise ValueError(
            f"the world's name generator found only {len(names)} of {n} names free of substring "
            "clashes; ask for fewer subjects or towns"
        )
