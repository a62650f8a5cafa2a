"""Writes the bundled demo sample ``uae_ray/assets/demo.jsonl`` (original, fictional text; deterministic).

Every document is one fictional entity (a town, an inventor, a ship, a bird, a festival, a firm) with three questions.
For each question the document holds a *distractor* that restates the question's words but lacks the answer, and a
*useful* passage that states the answer in other words (little lexical overlap with the question), plus one overview
passage. A semantic retriever ranks the distractor first; the generator's utility ranks the useful passage first: the
gap UAE closes. Run ``python -m uae_ray.eval.demo_sample [OUT]`` to regenerate the file.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 7
N_DOCS = 60
DEV_EVERY = 10  # documents i with i % 10 in DEV_SLOTS go to dev (30%), by document, never by question
DEV_SLOTS = (2, 5, 8)

_SYL = ["val", "dor", "mere", "kes", "tal", "bri", "ven", "os", "lun", "gar", "thi", "rak", "el", "mor", "sul", "fen",
        "ca", "ri", "ost", "wyn", "hal", "ber", "ny", "qua", "zel", "pim", "dra", "lo", "sev", "ant"]
_FIRST = ["Ilse", "Tomas", "Marek", "Odile", "Brannoc", "Yusra", "Petra", "Anselm", "Corin", "Dagny", "Fenna", "Gideon",
          "Hallie", "Ivo", "Jorunn", "Kasimir", "Liesel", "Matteo", "Nadia", "Orrin", "Priya", "Quentin", "Rosalind",
          "Soren", "Tamsin", "Ulric", "Vera", "Wendel", "Xenia", "Yorick"]
_FOODS = ["smoked eel pie", "barley dumplings", "plum soup", "fried river trout", "honey oat cakes", "lamb stew",
          "pickled herring", "chestnut bread", "mushroom pasties", "saffron rice"]
_COLOURS = ["copper red", "slate grey", "pale green", "deep violet", "amber yellow", "ink blue", "rust brown"]
_INSTRUMENTS = ["the hurdy-gurdy", "bone flutes", "the hammered dulcimer", "bagpipes", "frame drums", "the zither"]
_MONTHS = ["January", "March", "April", "June", "August", "September", "October", "November"]
_CARGO = ["salt cod", "tea", "timber", "wool bales", "copper ore", "spices", "rum"]
_PRODUCTS = ["folding umbrellas", "brass telescopes", "sewing machines", "clockwork toys", "wax candles",
             "bicycle bells", "glass lanterns"]
_DIETS = ["beetle larvae", "thistle seeds", "small frogs", "wild cherries", "river snails", "moths"]
_INVENTIONS = ["a steam-driven loom", "a tide clock", "a pocket barometer", "a rotary printing press",
               "a wind-up sewing needle", "a signal lamp"]


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {_name(rng)}"


def _year(rng: random.Random) -> str:
    return str(rng.randint(1620, 1940))


@dataclass(frozen=True)
class Attribute:
    """One question about an entity: its wording, the answer maker, useful-passage templates and the topic phrase."""

    question: str  # "{n}" is the entity name
    topic: str  # restated in distractors: "when {n} was founded"
    answer: str  # key of the answer maker
    useful: tuple[str, ...]  # "{a}" is the answer; few of the question's words


KINDS: dict[str, list[Attribute]] = {
    "town": [
        Attribute("When was the town of {n} founded?", "when the town of {n} was founded", "year",
                  ("Fishing families put up the first cottages by the river bend in {a}, and a market soon followed.",
                   "The oldest parish record of the settlement dates from {a}, the year its first houses went up.")),
        Attribute("What dish is {n} known for?", "which dish the town of {n} is known for", "food",
                  ("Every inn by the harbour serves {a}; cooks there guard the recipe jealously.",
                   "Travellers remember the {a} most of all, ladled out at every tavern near the square.")),
        Attribute("Who was the first mayor of {n}?", "who the first mayor of {n} was", "person",
                  ("The opening session of the new council elected {a} to lead it, a post held for twelve years.",
                   "{a}, a grain merchant, chaired the very first council and signed its charter.")),
        Attribute("Which river flows through {n}?", "which river flows through the town of {n}", "place",
                  ("Barges still float down the {a} past the old mills and under the stone bridge.",
                   "The {a} splits the streets into an east bank and a west bank, and floods every spring.")),
    ],
    "inventor": [
        Attribute("What did the inventor {n} invent?", "what the inventor {n} invented", "invention",
                  ("The workshop's great success was {a}, which factories copied within a decade.",
                   "Patent office files credit the workshop with {a}, built from scrap brass.")),
        Attribute("Where was the inventor {n} born?", "where the inventor {n} was born", "place",
                  ("The child grew up above a bakery in {a}, a small port on the northern coast.",
                   "Parish books in {a} record the baptism, in a house that still stands by the quay.")),
        Attribute("Who trained the inventor {n}?", "who trained the inventor {n}", "person",
                  ("An apprenticeship under {a}, a clockmaker with a temper, taught the craft.",
                   "Years at the bench of {a}, a watch repairer, gave the young mechanic a steady hand.")),
        Attribute("In what year did the inventor {n} receive a first patent?",
                  "in what year the inventor {n} received a first patent", "year",
                  ("The paperwork was stamped and sealed in {a} after two rejected drafts.",
                   "Officials approved the drawings in {a}, and the royalties paid for a larger shop.")),
    ],
    "ship": [
        Attribute("Who captained the ship {n}?", "who captained the ship {n}", "person",
                  ("{a} commanded her on every voyage, pacing the quarterdeck in all weather.",
                   "The crew answered to {a}, a veteran of the whaling fleets.")),
        Attribute("When was the ship {n} launched?", "when the ship {n} was launched", "year",
                  ("She slid down the slipway into the harbour in {a} before a cheering crowd.",
                   "Shipwrights finished her hull in {a}, and she took to the water that spring.")),
        Attribute("What cargo did the ship {n} carry?", "what cargo the ship {n} carried", "cargo",
                  ("Her holds were packed with {a} on almost every crossing.",
                   "Merchants filled her with {a}, which sold well in the southern ports.")),
        Attribute("What was the home port of the ship {n}?", "what the home port of the ship {n} was", "place",
                  ("Between voyages she always returned to moor at {a}, where her owners kept their offices.",
                   "She was registered at {a} and wintered in its sheltered basin.")),
    ],
    "bird": [
        Attribute("What does the {n} bird eat?", "what the {n} bird eats", "diet",
                  ("It feeds almost entirely on {a}, hunting at dawn and dusk.",
                   "Stomach samples show a diet of {a}, taken from low branches.")),
        Attribute("What colour are the feathers of the {n} bird?", "what colour the feathers of the {n} bird are",
                  "colour",
                  ("Its plumage is {a}, turning brighter in the breeding season.",
                   "Males show a {a} coat that makes them easy to spot against the reeds.")),
        Attribute("Who first described the {n} bird?", "who first described the {n} bird", "person",
                  ("The naturalist {a} sketched and named it after an expedition to the marshes.",
                   "Field notes by {a} gave the first account, with drawings of the nest.")),
        Attribute("Where does the {n} bird live?", "where the {n} bird lives", "place",
                  ("Its range is limited to the wetlands around {a}, where it nests in reed beds.",
                   "Surveys find it only near {a}, among flooded meadows and alder groves.")),
    ],
    "festival": [
        Attribute("In which month is the {n} festival held?", "in which month the {n} festival is held", "month",
                  ("Crowds gather each {a}, when the nights are long and the lanterns are lit.",
                   "The celebrations always fall in {a}, once the harvest is in.")),
        Attribute("Who started the {n} festival?", "who started the {n} festival", "person",
                  ("{a}, a retired schoolteacher, organised the very first gathering with a handful of neighbours.",
                   "The tradition goes back to {a}, who hired a band and invited the whole valley.")),
        Attribute("What instrument is played at the {n} festival?", "what instrument is played at the {n} festival",
                  "instrument",
                  ("Musicians bring {a} and play from dusk until the fires burn low.",
                   "The sound of {a} fills the square for three nights in a row.")),
        Attribute("What food is eaten at the {n} festival?", "what food is eaten at the {n} festival", "food",
                  ("Stalls hand out {a} to everyone who joins the procession.",
                   "Families cook {a} in big pots and share it on long tables outdoors.")),
    ],
    "company": [
        Attribute("Who founded the {n} company?", "who founded the {n} company", "person",
                  ("{a} opened the first workshop with money borrowed from a cousin.",
                   "The business began when {a} rented a shed behind the railway station.")),
        Attribute("What does the {n} company make?", "what the {n} company makes", "product",
                  ("Its factory turns out {a}, shipped to shops across the continent.",
                   "The catalogue lists nothing but {a}, in dozens of sizes.")),
        Attribute("Where is the {n} company headquartered?", "where the {n} company is headquartered", "place",
                  ("Its offices occupy a red-brick building in {a}, next to the canal.",
                   "Managers work from {a}, where the firm bought an old warehouse.")),
        Attribute("When was the {n} company established?", "when the {n} company was established", "year",
                  ("The first order was filled in {a}, and the ledger from that year survives.",
                   "Its registration papers are dated {a}, the year the founder turned thirty.")),
    ],
}

DISTRACTORS = (
    "People often ask {t}. The question of {t} comes up in nearly every conversation about {n}, "
    "and local guides like to raise it on their tours.",
    "A common question about {n} is {t}. Many articles about {n} discuss {t} at length, "
    "yet they leave the matter open.",
    "Readers curious about {n} usually want to know {t}. The museum's display about {n} poses the question of {t} "
    "on a large panel in the entrance hall.",
)

OVERVIEW = {
    "town": "{n} is a small town with narrow streets, a covered market and a stone bridge.",
    "inventor": "{n} was an inventor remembered for tireless tinkering and a cluttered workshop.",
    "ship": "The {n} was a three-masted sailing ship with a long and eventful career.",
    "bird": "The {n} is a shy bird that few people have seen in the wild.",
    "festival": "The {n} festival is a lively local celebration with music, dancing and food.",
    "company": "The {n} company is a family business that grew from a small workshop.",
}


def _answer(kind: str, rng: random.Random) -> str:
    makers = {
        "year": lambda: _year(rng),
        "food": lambda: rng.choice(_FOODS),
        "person": lambda: _person(rng),
        "place": lambda: _name(rng, 3),
        "invention": lambda: rng.choice(_INVENTIONS),
        "cargo": lambda: rng.choice(_CARGO),
        "diet": lambda: rng.choice(_DIETS),
        "colour": lambda: rng.choice(_COLOURS),
        "month": lambda: rng.choice(_MONTHS),
        "instrument": lambda: rng.choice(_INSTRUMENTS),
        "product": lambda: rng.choice(_PRODUCTS),
    }
    return makers[kind]()


def build_records(n_docs: int = N_DOCS, seed: int = SEED) -> list[dict]:
    """Passage and query records of the demo sample (the team's generic JSONL format)."""
    rng = random.Random(seed)
    kinds = sorted(KINDS)
    records: list[dict] = []
    used: set[str] = set()
    for i in range(n_docs):
        kind = kinds[i % len(kinds)]
        name = _name(rng)
        while name in used:
            name = _name(rng)
        used.add(name)
        doc_id = f"demo-{i:03d}"
        split = "dev" if i % DEV_EVERY in DEV_SLOTS else "train"
        attrs = rng.sample(KINDS[kind], 3)
        passages: list[tuple[str, str]] = [("overview", OVERVIEW[kind].format(n=name))]
        queries: list[dict] = []
        for j, attr in enumerate(attrs):
            ans = _answer(attr.answer, rng)
            topic = attr.topic.format(n=name)
            useful = rng.choice(attr.useful).format(a=ans)
            useful = useful[0].upper() + useful[1:]
            distractor = rng.choice(DISTRACTORS).format(t=topic, n=name)
            passages.append((f"u{j}", useful))
            passages.append((f"d{j}", distractor))
            queries.append({"qid": f"{doc_id}-q{j}", "question": attr.question.format(n=name), "answers": [ans],
                            "doc_id": doc_id, "split": split, "gold_pids": [f"{doc_id}#u{j}"]})
        rng.shuffle(passages)
        for tag, text in passages:
            records.append({"pid": f"{doc_id}#{tag}", "doc_id": doc_id, "title": name, "text": text})
        records.extend(queries)
    return records


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "assets" / "demo.jsonl"
    records = build_records()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    n_q = sum(1 for r in records if "question" in r)
    print(f"wrote {out}: {len(records) - n_q} passages, {n_q} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
