"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"): which of COCO's 80 objects a
description names, and how many of those the image lacks.

The rules are the public scorer's (utils/chair.py in LisaAnne/Hallucination; OPERA and later papers run a
copy of it), rewritten here without nltk/pattern:
  - the text is lower-cased and split into words and punctuation as nltk's word_tokenize does (`tokenize`);
  - plurals become singular (`singular`; the scorer used pattern's singularize, OPERA's copy WordNet);
  - adjacent word pairs are joined where the scorer joins them (`PAIRS`): two-word objects ("hot dog", "teddy
    bear", "stop sign") stay whole, so their second word is no object of its own; "baby"/"adult" before an
    animal word and "passenger" before "jet"/"train" are dropped (they would otherwise name a person);
    "bow tie" is a tie and "toilet seat" a toilet. Pairs are read left to right, each word in one pair at most;
  - "seat" is no chair when the text also names a toilet;
  - every remaining word that is an entry of the synonym list names that line's COCO object.
An image's true objects are its instance categories and the objects its reference captions name.
CHAIR_s is the share of descriptions naming an absent object; CHAIR_i the share of object mentions that name an
absent object, each mention counted (a description naming "dog" twice counts two mentions); recall (OPERA's
addition) the true objects named, over all true objects.
"""

from __future__ import annotations

import re

# Word pairs the scorer reads as one word: two-word objects map to themselves (an entry of the synonym list, or
# nothing when the list lacks it: "home plate" and "train track" only keep "plate" and "train" from counting)
TWO_WORD_OBJECTS = ("motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                    "mobile phone", "teddy bear", "hair drier", "potted plant", "laptop computer", "home plate",
                    "train track")
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")


def _pairs() -> dict[str, str]:
    pairs = {pair: pair for pair in TWO_WORD_OBJECTS}
    for animal in ANIMAL_WORDS:  # a baby elephant is an elephant, not a (human) baby
        pairs[f"baby {animal}"] = pairs[f"adult {animal}"] = animal
    for vehicle in ("jet", "train"):  # a passenger jet names no passenger
        pairs[f"passenger {vehicle}"] = vehicle
    pairs["bow tie"] = "tie"
    pairs["toilet seat"] = "toilet"
    return pairs


PAIRS = _pairs()

# Plural -> singular. Irregular forms first, then suffix rules; a candidate counts only when it is a word of the
# vocabulary (synonym entries and pair words), so "bus" or "glass" never lose their s.
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
             "geese": "goose", "oxen": "ox", "teeth": "tooth", "feet": "foot", "knives": "knife", "calves": "calf",
             "leaves": "leaf", "wolves": "wolf", "shelves": "shelf", "loaves": "loaf"}
SUFFIXES = (("men", "man"), ("ies", "y"), ("ves", "f"), ("ves", "fe"), ("s", ""), ("es", ""))


def singular(word: str, vocabulary: set[str] | frozenset[str]) -> str:
    """The vocabulary word `word` is a plural of, or `word` itself (also when it is a vocabulary word already:
    "skis", "scissors", "people" are entries of the synonym list)."""
    if word in vocabulary:
        return word
    candidates = [IRREGULAR[word]] if word in IRREGULAR else []
    candidates += [word[: -len(end)] + repl for end, repl in SUFFIXES if word.endswith(end) and len(word) > len(end)]
    return next((c for c in candidates if c in vocabulary), word)


# nltk's word_tokenize (Treebank rules): these characters are tokens of their own; ',' and ':' unless a digit
# follows (1,000 and 3:30 stay whole); hyphens, slashes and '*' do not split
_PUNCTUATION = re.compile(r"""(\.\.\.|--|[;@#$%&?!()\[\]{}<>"`]|[,:](?!\d))""")
_CLITIC = re.compile(r"^(.*[^'])('s|'m|'d|'ll|'re|'ve|n't|')$")  # dog's -> dog 's; dogs' -> dogs '


def tokenize(text: str) -> list[str]:
    """Words and punctuation of `text`, lower-cased: a sentence's final period and clitics split off as nltk's
    word_tokenize splits them."""
    tokens = []
    for chunk in _PUNCTUATION.sub(r" \1 ", text.lower()).split():
        tail = []
        while len(chunk) > 1 and chunk.endswith(".") and not chunk.endswith(".."):  # "dog." -> dog .
            chunk, tail = chunk[:-1], ["."] + tail
        if chunk.startswith("'") and len(chunk) > 1 and not _CLITIC.match(chunk):  # 'dog -> ' dog
            tokens.append("'")
            chunk = chunk[1:]
        match = _CLITIC.match(chunk)
        tokens += [match.group(1), match.group(2)] if match else [chunk]
        tokens += tail
    return tokens


class ChairRules:
    """The synonym list (one COCO object per line, then its synonyms) and the scorer's rules over it."""

    def __init__(self, synonyms_text: str):
        self.object_of: dict[str, str] = {}
        for line in synonyms_text.splitlines():
            if line.strip():
                # split on ", " as the scorer does: an entry after a doubled space keeps its leading space and
                # never matches (the public list has two, " motor bike" and " cheesecake")
                entries = line.strip().split(", ")
                for entry in entries:
                    self.object_of[entry] = entries[0]
        self.vocabulary = frozenset(w for phrase in [*self.object_of, *PAIRS] for w in phrase.split(" ") if w)

    def words(self, text: str) -> list[str]:
        """The text's words after singularising and joining pairs, before the object look-up."""
        words = [singular(w, self.vocabulary) for w in tokenize(text)]
        joined, i = [], 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            if pair in PAIRS:
                joined.append(PAIRS[pair])
                i += 2
            else:
                joined.append(words[i])
                i += 1
        if "toilet" in joined and "seat" in joined:  # "the seat of the toilet" names no chair
            joined = [w for w in joined if w != "seat"]
        return joined

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """(word, COCO object) for each object mention, in order, repeats included."""
        return [(w, self.object_of[w]) for w in self.words(text) if w in self.object_of]


def judge_description(text: str, truth: set[str], rules: ChairRules) -> dict:
    """One description against its image's true objects: the objects it names (each mention), those absent."""
    named = [obj for _, obj in rules.mentions(text)]
    return {"named": named, "hallucinated": [obj for obj in named if obj not in truth],
            "recalled": sorted({obj for obj in named if obj in truth}), "truth": len(truth)}


def chair_metrics(per_item: list[dict]) -> dict:
    """CHAIR_s, CHAIR_i and recall in percent (as papers report them) over `judge_description` results."""
    n = len(per_item)
    mentions = sum(len(p["named"]) for p in per_item)
    truth = sum(p["truth"] for p in per_item)
    return {"chair_s": 100 * sum(bool(p["hallucinated"]) for p in per_item) / n if n else 0.0,
            "chair_i": 100 * sum(len(p["hallucinated"]) for p in per_item) / mentions if mentions else 0.0,
            "recall": 100 * sum(len(p["recalled"]) for p in per_item) / truth if truth else 0.0,
            "mentions_per_description": mentions / n if n else 0.0,
            "count": n}
