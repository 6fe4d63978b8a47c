"""A FLAN-style multi-task instruction mixture generated offline and deterministically from a seed.

Each task family has several instruction templates (FLAN's recipe: many phrasings per task) and a checkable answer.
`HELD_IN_FAMILIES` form the training and validation splits; `HELD_OUT_FAMILIES` appear only in the `heldout` split,
for zero-shot evaluation of instruction following on unseen tasks.
"""

import random
from collections.abc import Callable

from datasets import Dataset, DatasetDict

WORDS = ("apple river stone cloud tiger piano garden silver rocket candle forest window bridge orange pencil "
         "ocean planet yellow castle dragon winter summer marble lemon falcon harbor meadow violet copper "
         "thunder lantern pepper canyon mirror island ribbon saddle walnut glacier").split()
POSITIVE = ("wonderful delightful excellent lovely brilliant superb charming fantastic pleasant great").split()
NEGATIVE = ("terrible awful dreadful boring horrible disappointing poor clumsy annoying bad").split()
SUBJECTS = ("the movie", "this book", "the dinner", "our trip", "the concert", "this phone", "the hotel")
NAMES = ("Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas")

Example = tuple[str, str]  # (instruction, answer)


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    template = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}. Answer with a number."])
    return template.format(a=a, b=b), str(a + b)


def _multiplication(rng: random.Random) -> Example:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    template = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}."])
    return template.format(a=a, b=b), str(a * b)


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable random word (consonant-vowel pairs): a task space large enough for distinct prompts."""
    return "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def _reverse_word(rng: random.Random) -> Example:
    word = rng.choice([rng.choice(WORDS), _pseudo_word(rng)])
    template = rng.choice(["Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write the letters of '{w}' in "
                                                                               "reverse order."])
    return template.format(w=word), word[::-1]


def _uppercase(rng: random.Random) -> Example:
    phrase = " ".join(rng.sample(WORDS, 2))
    template = rng.choice(["Write '{p}' in capital letters.", "Convert to upper case: {p}", "Uppercase this: {p}"])
    return template.format(p=phrase), phrase.upper()


def _sentiment(rng: random.Random) -> Example:
    label = rng.choice(["positive", "negative"])
    adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    review = f"{rng.choice(SUBJECTS).capitalize()} was {adjective}."
    template = rng.choice(["Is this review positive or negative? {r}", "Sentiment (positive/negative): {r}",
                           "Classify the sentiment of the review as positive or negative.\nReview: {r}"])
    return template.format(r=review), label


def _parity(rng: random.Random) -> Example:
    number = rng.randint(1, 999)
    template = rng.choice(["Is {n} even or odd?", "Answer even or odd: {n}", "Tell me whether {n} is even or odd."])
    return template.format(n=number), "even" if number % 2 == 0 else "odd"


def _extract_name(rng: random.Random) -> Example:
    name, word = rng.choice(NAMES), rng.choice(WORDS)
    sentence = rng.choice([f"Yesterday {name} bought a {word}.", f"The {word} was found by {name}.",
                           f"{name} likes the {word} very much."])
    template = rng.choice(["Who is mentioned in this sentence? {s}", "Extract the person's name: {s}",
                           "Name the person in: {s}"])
    return template.format(s=sentence), name


def _count_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(2, 7))
    template = rng.choice(["How many words are in '{s}'?", "Count the words: {s}", "Number of words in: {s}"])
    return template.format(s=" ".join(words)), str(len(words))


def _last_word(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 6))
    template = rng.choice(["What is the last word of '{s}'?", "Give the final word: {s}"])
    return template.format(s=" ".join(words)), words[-1]


def _largest_number(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), 3)
    template = rng.choice(["Which number is largest: {n}?", "Find the maximum of {n}."])
    return template.format(n=", ".join(map(str, numbers))), str(max(numbers))


def _subtraction(rng: random.Random) -> Example:
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    template = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}."])
    return template.format(a=a, b=b), str(a - b)


HELD_IN_FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "addition": _addition, "multiplication": _multiplication, "reverse_word": _reverse_word,
    "uppercase": _uppercase, "sentiment": _sentiment, "parity": _parity, "extract_name": _extract_name,
    "count_words": _count_words,
}
HELD_OUT_FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "last_word": _last_word, "largest_number": _largest_number, "subtraction": _subtraction,
}


def _examples(families: dict, per_family: int, seed: int, exclude: set[str]) -> list[dict]:
    rows = []
    for family_index, (family, make) in enumerate(families.items()):
        rng = random.Random(seed * 1000 + family_index)
        seen, produced = set(exclude), 0
        for _ in range(per_family * 50):  # bounded retries: small task spaces run out of distinct prompts
            if produced == per_family:
                break
            instruction, answer = make(rng)
            if instruction in seen:
                continue
            seen.add(instruction)
            produced += 1
            rows.append({"family": family, "answer": answer,
                         "messages": [{"role": "user", "content": instruction},
                                      {"role": "assistant", "content": answer}]})
    return rows


def build_mixture(train_per_family: int = 200, eval_per_family: int = 25, seed: int = 0) -> DatasetDict:
    """`train` and `validation` (held-in families, no shared prompt) and `heldout` (unseen families).

    Rows: `family`, `messages` (user instruction, assistant answer) and `answer`. The same seed gives the same data.
    """
    train = _examples(HELD_IN_FAMILIES, train_per_family, seed, exclude=set())
    train_prompts = {row["messages"][0]["content"] for row in train}
    validation = _examples(HELD_IN_FAMILIES, eval_per_family, seed + 1, exclude=train_prompts)
    heldout = _examples(HELD_OUT_FAMILIES, eval_per_family, seed + 2, exclude=set())
    random.Random(seed).shuffle(train)
    return DatasetDict(train=Dataset.from_list(train), validation=Dataset.from_list(validation),
                       heldout=Dataset.from_list(heldout))
