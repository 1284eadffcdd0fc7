"""An offline instruction-following task in IFEval format, with a programmatic expert.

The Hugging Face Hub is out of reach, and IFEval itself is far beyond what a model of one or two million parameters can
learn, so this module generates a small task of the same shape. Each prompt asks for a short note about one of
[`TOPICS`] and adds one to three IFEval instructions drawn from [`INSTRUCTION_IDS`]. The instruction text is produced
by the lm-eval checkers' own `build_description(**kwargs)`, and the rows carry the IFEval columns
`instruction_id_list` and `kwargs`, so [`trl_uniapl.rewards`] and [`trl_uniapl.evaluation`] score them with lm-eval's
checkers, exactly as they would score google/IFEval.

Three choices keep the task from being gamed by one constant, prompt-independent reply:

- every row has a topic, checked through the `topic_keywords` column (at least one keyword as a whole word, see
  [`trl_uniapl.rewards.mentions_topic`]), and [`TOPICS`] do not share keywords;
- `change_case:english_lowercase` and `change_case:english_capital` are mutually exclusive ([`EXCLUSIVE_INSTRUCTIONS`]:
  never in one prompt), so no reply can satisfy every case instruction;
- `keywords:forbidden_words` forbids words of the row's own topic (never its main word `topic_keywords[0]`, never a
  word of `keywords:existence`), so the usual note on the topic often fails it.

[`teacher_response`] is the expert: it follows every instruction of its row and stays on topic, in a few lines (about
30 tokens of the student's tokenizer on average, 99% under 56). Where the outcome depends on `langdetect` (the case
checkers ask it whether the text is English, which is unreliable on short text) or on a word count, the teacher checks
its candidate with lm-eval's checker and, if needed, takes the next of a few deterministic alternatives. Without a
case instruction, the teacher writes mixed case and always uses a comma; it adds no title, quotation marks, bullets,
postscript or end phrase unless asked, so each instruction's effect appears (almost) only when requested, see
[`trl_uniapl.evaluation.evaluate_ifeval`]. [`plain_response`] writes on topic and ignores every instruction: the
warm-up data of [`trl_uniapl.student`].

[`make_splits`] returns seeded `demonstrations` (with teacher completions), `preference` (prompts only) and `eval`.
The `eval` split holds out generalisation on two axes: [`HELDOUT_TOPICS`] never appear in training rows, and training
rows never contain a pair of [`HELDOUT_COMBINATIONS`]; columns `unseen_topic` and `unseen_combination` flag such rows.

`kwargs` storage: each row's `kwargs` is a list of dicts that all have the keys of [`KWARG_KEYS`], unused ones `None`
(the google/IFEval layout, storable by Arrow). The rewards also accept JSON strings of dicts.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, Features, List, Value

from .rewards import instructions_registry, normalize_ifeval_kwargs, prompt_text

TASK_VERSION = "1"


@dataclass(frozen=True)
class Topic:
    """One topic of the task.

    Attributes:
        name (`str`): How prompts name it ("Write a short note about {name}.").
        title (`str`): The teacher's title when one is requested; it contains no word of `keywords[1:]`.
        keywords (`tuple[str, ...]`): Topic keywords; `keywords[0]` is the main word and also appears in `name`.
        sentences (`tuple[str, ...]`): On-topic sentences, each of at most 12 words, each with at least one keyword.
            The first, the lead, starts with `name`, has a comma and no word of `keywords[1:]` (so it is never
            forbidden); the teacher always opens with it, which lets a student name an unseen topic by copying it.
    """

    name: str
    title: str
    keywords: tuple[str, ...]
    sentences: tuple[str, ...]


def _topic(name: str, title: str, keywords: str, *sentences: str) -> Topic:
    return Topic(name, title, tuple(keywords.split()), sentences)


TOPICS: tuple[Topic, ...] = (
    _topic(
        "the ocean",
        "Ocean Life",
        "ocean waves tides coral salt",
        "The ocean covers most of our planet, and it is very deep.",
        "Waves roll in every day, pushed by wind and tides.",
        "Coral reefs grow in warm and clear ocean water.",
        "Salt makes the water heavy, so swimmers float with ease.",
    ),
    _topic(
        "honey bees",
        "Busy Bees",
        "bees hive pollen flowers crops",
        "Honey bees are busy insects, and each one has a job.",
        "Bees live together in a hive and share the work.",
        "They visit flowers all day to gather pollen and nectar.",
        "Without bees, many flowers and crops would not grow.",
    ),
    _topic(
        "volcanoes",
        "Fire Mountains",
        "volcanoes lava eruption ash magma",
        "Volcanoes are mountains of fire, and some are still active.",
        "During an eruption, lava flows down the slopes like a river.",
        "Ash from a big eruption can cover whole towns.",
        "Hot magma rises slowly through the crust below.",
    ),
    _topic(
        "the moon",
        "Our Moon",
        "moon craters orbit night phases",
        "The moon is our nearest neighbor, and it has no air.",
        "Its surface is covered with craters from old impacts.",
        "One orbit around the earth takes about a month.",
        "We see the moon change shape as its phases go by.",
    ),
    _topic(
        "coffee",
        "Morning Coffee",
        "coffee beans roast caffeine mug",
        "Coffee is loved all over the world, and many drink it daily.",
        "It comes from roasted beans that grow on small trees.",
        "A dark roast tastes bold, while a light roast is fruity.",
        "A warm mug of coffee with some caffeine starts the day.",
    ),
    _topic(
        "bicycles",
        "Pedal Power",
        "bicycles pedals wheels helmet ride",
        "Bicycles are simple machines, and they need no fuel at all.",
        "You push the pedals to turn the wheels and move ahead.",
        "A good helmet keeps every rider safe.",
        "A short ride to work is good for your health.",
    ),
    _topic(
        "rain forests",
        "Green Worlds",
        "forests trees canopy jungle vines",
        "Rain forests are warm and wet, and they are full of life.",
        "Tall trees form a thick canopy high above the ground.",
        "Vines climb up the trunks to reach the light.",
        "Many animals of the jungle never touch the ground.",
    ),
    _topic(
        "chess",
        "The Royal Game",
        "chess board pawns knight checkmate",
        "Chess is a game of planning, and each move matters.",
        "The board has sixty four squares in two colors.",
        "Pawns move slowly, but the knight can jump over pieces.",
        "A game ends with checkmate or a draw.",
    ),
    _topic(
        "bread baking",
        "Fresh Bread",
        "bread dough oven flour yeast",
        "Bread baking is an old craft, and it is easy to learn.",
        "You need only flour, water, salt and yeast.",
        "The dough must rest so the yeast can make it rise.",
        "A hot oven gives the loaf a golden crust.",
    ),
    _topic(
        "the desert",
        "Desert Days",
        "desert sand dunes cactus camels",
        "The desert is dry, and rain may not fall for years.",
        "Wind shapes the sand into long and rolling dunes.",
        "A cactus stores water in its thick green stem.",
        "Camels can walk for days without a drink.",
    ),
    _topic(
        "soccer",
        "The Beautiful Game",
        "soccer ball goal team players",
        "Soccer is the most popular sport, and fans love it.",
        "Each team has eleven players on the field.",
        "Players may not touch the ball with their hands.",
        "One late goal can change the whole match.",
    ),
    _topic(
        "trains",
        "All Aboard",
        "trains tracks station engine rails",
        "Trains carry people and goods, and they do it quietly.",
        "The engine pulls a long line of cars along the tracks.",
        "Steel rails guide every wheel from station to station.",
        "A busy station never seems to sleep.",
    ),
    _topic(
        "penguins",
        "Tuxedo Birds",
        "penguins ice chicks colony swim",
        "Penguins cannot fly, but they are very good in water.",
        "They live in a large colony on the ice.",
        "Parents take turns keeping their chicks warm.",
        "They swim fast and chase fish with great skill.",
    ),
    _topic(
        "guitars",
        "Playing Guitar",
        "guitars strings chords frets songs",
        "Guitars are easy to carry, and many people learn to play them.",
        "Players press the strings against the frets to change the pitch.",
        "A few simple chords are enough for many songs.",
        "Old guitars often sound warmer than new ones.",
    ),
    _topic(
        "mountains",
        "Mountain Air",
        "mountains peaks climbers summit cliffs",
        "Mountains rise high above the land, and the air is thin.",
        "Climbers train for months before they try a summit.",
        "Steep cliffs and sharp peaks make the climb hard.",
        "The view from the top of the mountains is worth the effort.",
    ),
    _topic(
        "gardening",
        "In the Garden",
        "gardening seeds soil weeds plants",
        "Gardening takes patience, but the reward is sweet.",
        "Seeds need good soil, sunlight and water to sprout.",
        "Pulling weeds gives young plants room to grow.",
        "Healthy plants, in turn, feed birds and insects.",
    ),
    _topic(
        "the library",
        "Quiet Pages",
        "library books shelves readers librarian",
        "The library is a quiet place, and anyone may come in.",
        "Long shelves hold books about almost every subject.",
        "A kind librarian helps readers find what they need.",
        "Many readers spend whole afternoons in the library.",
    ),
    _topic(
        "thunderstorms",
        "Storm Warning",
        "thunderstorms thunder lightning clouds rain",
        "Thunderstorms build on hot days, and they can be loud.",
        "Dark clouds gather before the rain begins to fall.",
        "Lightning flashes first, then the thunder follows.",
        "Most thunderstorms pass within an hour or two.",
    ),
    _topic(
        "cats",
        "Feline Friends",
        "cats whiskers purr kittens paws",
        "Cats are curious animals, and they love warm places.",
        "They use their whiskers to feel their way in the dark.",
        "A happy cat will purr when you stroke its fur.",
        "Kittens play with soft paws and tiny claws.",
    ),
    _topic(
        "dogs",
        "Loyal Dogs",
        "dogs bark puppies leash tail",
        "Dogs are loyal friends, and they love to play outside.",
        "A wagging tail usually means a happy dog.",
        "Puppies need short walks on a light leash.",
        "Some dogs bark at every sound they hear.",
    ),
    _topic(
        "pizza",
        "Pizza Night",
        "pizza cheese crust sauce slice",
        "Pizza began in Italy, and now it is eaten everywhere.",
        "A thin crust gets crisp in a very hot oven.",
        "Tomato sauce and melted cheese are the classic toppings.",
        "One warm slice is rarely enough.",
    ),
    _topic(
        "the sun",
        "Our Sun",
        "sun sunlight star solar warmth",
        "The sun rises every morning, and it warms our whole planet.",
        "It is a star at the center of our system.",
        "Sunlight takes about eight minutes to reach the earth.",
        "Solar panels turn its warmth and light into power.",
    ),
    _topic(
        "airplanes",
        "Jets and Props",
        "airplanes wings pilots runway flight",
        "Airplanes carry millions of people, and they cross oceans in hours.",
        "They fly because air moves faster over their wings.",
        "Pilots check every system before a long flight.",
        "The plane speeds down the runway, then lifts into the sky.",
    ),
    _topic(
        "recycling",
        "Reduce and Reuse",
        "recycling plastic bins paper waste",
        "Recycling is good for the planet, and it saves energy.",
        "We put paper and plastic into separate bins.",
        "Old bottles can be made into new plastic things.",
        "Less waste means that the world stays clean.",
    ),
    _topic(
        "rivers",
        "Flowing Rivers",
        "rivers water stream banks fish",
        "Rivers flow toward the sea, and they shape the land.",
        "Each one starts as a small stream high in the hills.",
        "Trees and reeds grow on the banks, and birds nest there.",
        "Many fish swim upstream each year to lay their eggs.",
    ),
    _topic(
        "photography",
        "Taking Pictures",
        "photography camera lens photos light",
        "Photography is a popular hobby, and anyone can try it.",
        "A good lens makes photos sharp and clear.",
        "Soft morning light is the favorite of many people with a camera.",
        "Old photos help families remember their past.",
    ),
    _topic(
        "tea",
        "Tea Time",
        "tea leaves kettle cup steam",
        "Tea is loved worldwide, and it comes in many flavors.",
        "It is made from the dried leaves of a small bush.",
        "Boil water in a kettle, then pour it over the leaves.",
        "Steam rises from a fresh cup on a cold day.",
    ),
    _topic(
        "winter",
        "Winter White",
        "winter snow frost sledding cold",
        "Winter brings short days, and the nights grow long.",
        "Fresh snow covers the roofs and the streets.",
        "Frost draws thin patterns on the windows at dawn.",
        "Children love sledding down the hills in the cold.",
    ),
    _topic(
        "robots",
        "Robot Helpers",
        "robots sensors motors machines code",
        "Robots can do many jobs, and they never get tired.",
        "They are machines that follow code written by people.",
        "Sensors tell a robot what is around it.",
        "Small motors move its arms and wheels.",
    ),
    _topic(
        "the piano",
        "Piano Time",
        "piano keys notes pianist melody",
        "The piano is a grand instrument, and it sounds lovely.",
        "It has eighty eight keys, both black and white.",
        "Each key strikes a string to make its notes.",
        "A skilled pianist can play a melody with one hand.",
    ),
    _topic(
        "butterflies",
        "Wings of Color",
        "butterflies caterpillars cocoon nectar meadow",
        "Butterflies are delicate insects, and they love warm days.",
        "They begin life as caterpillars that eat a lot.",
        "Inside a cocoon, the body slowly changes shape.",
        "Adults drink sweet nectar in a summer meadow.",
    ),
    _topic(
        "camping",
        "Under the Stars",
        "camping tent campfire marshmallows trail",
        "Camping is a chance to slow down, and to enjoy nature.",
        "First, we pitch the tent on flat and dry ground.",
        "In the evening, we roast marshmallows over the campfire.",
        "A quiet trail leads from the camp to the lake.",
    ),
    _topic(
        "apples",
        "An Apple a Day",
        "apples orchard cider pie crunch",
        "Apples grow on trees, and there are thousands of kinds.",
        "In autumn, the orchard is full of ripe fruit.",
        "Some apples are pressed into sweet cider or baked in a pie.",
        "A fresh apple has a loud and happy crunch.",
    ),
    _topic(
        "elephants",
        "Gentle Giants",
        "elephants trunk tusks herd savanna",
        "Elephants are the largest land animals, and they are very smart.",
        "An elephant uses its trunk to drink and to grab food.",
        "A herd is led by the oldest female.",
        "On the savanna, elephants walk many miles for water.",
    ),
    _topic(
        "the city at night",
        "City Lights",
        "city streets neon traffic skyline",
        "The city at night never sleeps, and its lights burn on.",
        "Neon signs glow above the busy streets.",
        "The traffic slows down a little after midnight.",
        "From a bridge, the skyline looks like a field of stars.",
    ),
    _topic(
        "swimming",
        "Swim Day",
        "swimming pool laps goggles diving",
        "Swimming works every muscle, and it is gentle on the joints.",
        "Goggles help swimmers see under the water.",
        "Many people swim laps in the pool early in the morning.",
        "Diving from the high board takes some courage.",
    ),
    _topic(
        "owls",
        "Night Hunters",
        "owls feathers hoot prey nests",
        "Owls hunt at night, and they fly without a sound.",
        "Soft feathers let them glide silently toward their prey.",
        "You may hear a hoot from the woods after dark.",
        "Many owls make their nests in hollow trees.",
    ),
    _topic(
        "clocks",
        "Keeping Time",
        "clocks minutes hours ticking pendulum",
        "Clocks measure time, and we check them all day long.",
        "The long hand counts the minutes around the face.",
        "The short hand moves slowly through the hours.",
        "An old pendulum clock keeps ticking in the hall.",
    ),
    _topic(
        "kites",
        "Up in the Air",
        "kites breeze spools flying sky",
        "Kites are fun to fly, and an open field helps.",
        "A steady breeze lifts them high into the sky.",
        "The line unwinds from spools as the kite climbs.",
        "Flying a kite is easy once it catches the wind.",
    ),
    _topic(
        "chocolate",
        "Sweet Treats",
        "chocolate cocoa sugar bars dessert",
        "Chocolate is a favorite treat, and it is loved by many.",
        "It is made from the beans of the cocoa tree.",
        "Dark chocolate has less sugar than milk chocolate.",
        "Small bars make a nice gift or a quick dessert.",
    ),
)
"""All topics, training topics first, the eight held-out topics ([`HELDOUT_TOPICS`]) last."""

NUM_HELDOUT_TOPICS = 8
TRAIN_TOPICS: tuple[Topic, ...] = TOPICS[:-NUM_HELDOUT_TOPICS]
HELDOUT_TOPICS: tuple[Topic, ...] = TOPICS[-NUM_HELDOUT_TOPICS:]
TOPICS_BY_NAME: dict[str, Topic] = {topic.name: topic for topic in TOPICS}

LOWERCASE = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
NO_COMMA = "punctuation:no_comma"
QUOTATION = "startend:quotation"
END_CHECKER = "startend:end_checker"
TITLE = "detectable_format:title"
EXISTENCE = "keywords:existence"
FORBIDDEN = "keywords:forbidden_words"
NUMBER_WORDS = "length_constraints:number_words"
BULLETS = "detectable_format:number_bullet_lists"
POSTSCRIPT = "detectable_content:postscript"

INSTRUCTION_IDS: tuple[str, ...] = (
    LOWERCASE,
    CAPITAL,
    NO_COMMA,
    QUOTATION,
    END_CHECKER,
    TITLE,
    EXISTENCE,
    FORBIDDEN,
    NUMBER_WORDS,
    BULLETS,
    POSTSCRIPT,
)
"""The IFEval instruction types of the task (ids of lm-eval's `INSTRUCTION_DICT`)."""

EXCLUSIVE_INSTRUCTIONS: tuple[frozenset[str], ...] = (frozenset({LOWERCASE, CAPITAL}),)
"""Pairs of instructions that contradict each other and never appear in one prompt."""

HELDOUT_COMBINATIONS: tuple[frozenset[str], ...] = (
    frozenset({NO_COMMA, QUOTATION}),
    frozenset({TITLE, POSTSCRIPT}),
    frozenset({CAPITAL, END_CHECKER}),
    frozenset({LOWERCASE, BULLETS}),
    frozenset({EXISTENCE, NUMBER_WORDS}),
)
"""Pairs of instructions that no training row contains; `eval` rows flagged `unseen_combination` contain one."""

END_PHRASES: tuple[str, ...] = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "That is all for today.",
)
"""End phrases of `startend:end_checker` (the first two are lm-eval's own options)."""

EXISTENCE_KEYWORDS: tuple[str, ...] = ("window", "friend", "story", "music", "family", "journey", "smile", "lesson")
"""Words that `keywords:existence` asks for; none is a topic keyword."""

POSTSCRIPT_MARKERS: tuple[str, ...] = ("P.S.", "P.P.S")
INSTRUCTION_COUNT_WEIGHTS: tuple[float, float, float] = (0.5, 0.35, 0.15)
"""Probabilities of one, two and three instructions in a prompt."""
NUMBER_WORDS_OPTIONS: dict[str, tuple[int, ...]] = {"less than": (30, 40, 50), "at least": (15, 20, 25, 30)}
NUM_BULLETS_OPTIONS: tuple[int, ...] = (1, 2, 3)
PROMPT_OPENERS: tuple[str, ...] = (
    "Write a short note about {name}.",
    "Tell me about {name}.",
    "Write a few lines about {name}.",
)

_KEYWORD_SENTENCE = "It also brings to mind {words}."
_POSTSCRIPT = "Thanks for asking about {name}."
_FALLBACK_SENTENCES = (
    "This is a short note about {main}, and I hope that you like it.",
    "People often talk about {main}, and they rarely get bored.",
    "There is always more to say about {main}, of course.",
    "Here is what I know about {main}, in a few words.",
)

KWARG_KEYS: tuple[str, ...] = (
    "end_phrase",
    "forbidden_words",
    "keywords",
    "num_bullets",
    "num_words",
    "postscript_marker",
    "relation",
)
"""Keys of every `kwargs` dict of the task's rows (unused ones are `None`)."""

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
_KWARGS = List(
    {
        "end_phrase": Value("string"),
        "forbidden_words": List(Value("string")),
        "keywords": List(Value("string")),
        "num_bullets": Value("int64"),
        "num_words": Value("int64"),
        "postscript_marker": Value("string"),
        "relation": Value("string"),
    }
)
_BASE_FEATURES = {
    "prompt": _MESSAGES,
    "instruction_id_list": List(Value("string")),
    "kwargs": _KWARGS,
    "topic": Value("string"),
    "topic_keywords": List(Value("string")),
}
SPLIT_FEATURES: dict[str, Features] = {
    "demonstrations": Features({**_BASE_FEATURES, "completion": _MESSAGES}),
    "preference": Features(_BASE_FEATURES),
    "eval": Features(
        {
            **_BASE_FEATURES,
            "expert_completion": _MESSAGES,
            "unseen_topic": Value("bool"),
            "unseen_combination": Value("bool"),
        }
    ),
}
"""Arrow schema of each split of [`make_splits`]."""


def _contains_word(text: str, words: Sequence[str]) -> bool:
    return any(re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE) for word in words)


def _conflicts(instruction_ids: Sequence[str], exclude_pairs: Sequence[frozenset[str]]) -> bool:
    chosen = set(instruction_ids)
    return any(pair <= chosen for pair in (*EXCLUSIVE_INSTRUCTIONS, *exclude_pairs))


def _sample_kwargs(instruction_id: str, topic: Topic, rng: random.Random) -> dict[str, Any]:
    if instruction_id == EXISTENCE:
        return {"keywords": [rng.choice(EXISTENCE_KEYWORDS)]}
    if instruction_id == FORBIDDEN:
        return {"forbidden_words": sorted(rng.sample(topic.keywords[1:], rng.choice((1, 2))))}
    if instruction_id == NUMBER_WORDS:
        relation = rng.choice(tuple(NUMBER_WORDS_OPTIONS))
        return {"num_words": rng.choice(NUMBER_WORDS_OPTIONS[relation]), "relation": relation}
    if instruction_id == BULLETS:
        return {"num_bullets": rng.choice(NUM_BULLETS_OPTIONS)}
    if instruction_id == POSTSCRIPT:
        return {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)}
    if instruction_id == END_CHECKER:
        return {"end_phrase": rng.choice(END_PHRASES)}
    return {}


def _sample_instruction_ids(rng: random.Random, unseen_combination: bool) -> list[str]:
    num_instructions = rng.choices((1, 2, 3), weights=INSTRUCTION_COUNT_WEIGHTS)[0]
    while True:
        if unseen_combination:
            chosen = list(rng.choice(HELDOUT_COMBINATIONS))
            if num_instructions == 3:
                chosen.append(rng.choice([i for i in INSTRUCTION_IDS if i not in chosen]))
            rng.shuffle(chosen)
            if not _conflicts(chosen, ()):
                return chosen
        else:
            chosen = rng.sample(INSTRUCTION_IDS, num_instructions)
            if not _conflicts(chosen, HELDOUT_COMBINATIONS):
                return chosen


def make_row(
    topic: Topic, instruction_id_list: Sequence[str], kwargs: Sequence[dict[str, Any]], opener: int = 0
) -> dict[str, Any]:
    """Build one row: the prompt text comes from the checkers' own `build_description(**kwargs)`.

    Args:
        topic ([`Topic`]): The topic of the note.
        instruction_id_list (`Sequence[str]`): Ids of [`INSTRUCTION_IDS`].
        kwargs (`Sequence[dict[str, Any]]`): Arguments of each instruction (missing [`KWARG_KEYS`] become `None`).
        opener (`int`, *optional*, defaults to `0`): Index of [`PROMPT_OPENERS`].

    Returns:
        `dict[str, Any]`: a row with conversational `prompt`, `instruction_id_list`, `kwargs`, `topic` and
        `topic_keywords`.
    """
    descriptions = []
    for instruction_id, arguments in zip(instruction_id_list, kwargs):
        checker = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        descriptions.append(checker.build_description(**{k: v for k, v in arguments.items() if v is not None}))
    text = " ".join([PROMPT_OPENERS[opener].format(name=topic.name), *descriptions])
    return {
        "prompt": [{"role": "user", "content": text}],
        "instruction_id_list": list(instruction_id_list),
        "kwargs": [{key: arguments.get(key) for key in KWARG_KEYS} for arguments in kwargs],
        "topic": topic.name,
        "topic_keywords": list(topic.keywords),
    }


def sample_row(rng: random.Random, topics: Sequence[Topic] = TRAIN_TOPICS, unseen_combination: bool = False) -> dict:
    """Sample one row from `rng`: a topic of `topics`, one to three instructions and their arguments.

    Args:
        rng (`random.Random`): Source of randomness.
        topics (`Sequence[Topic]`, *optional*, defaults to [`TRAIN_TOPICS`]): Topics to draw from.
        unseen_combination (`bool`, *optional*, defaults to `False`): If `True`, the row contains a pair of
            [`HELDOUT_COMBINATIONS`]; if `False`, it contains none.

    Returns:
        `dict`: a row as [`make_row`] builds it.
    """
    topic = rng.choice(topics)
    instruction_id_list = _sample_instruction_ids(rng, unseen_combination)
    kwargs = [_sample_kwargs(instruction_id, topic, rng) for instruction_id in instruction_id_list]
    return make_row(topic, instruction_id_list, kwargs, opener=rng.randrange(len(PROMPT_OPENERS)))


def generate_rows(
    num_rows: int, seed: int = 0, topics: Sequence[Topic] = TRAIN_TOPICS, unseen_combination: bool = False
) -> list[dict]:
    """Generate `num_rows` rows with [`sample_row`] from `random.Random(seed)` (duplicates possible).

    Returns:
        `list[dict]`: rows as [`make_row`] builds them.
    """
    rng = random.Random(seed)
    return [sample_row(rng, topics, unseen_combination) for _ in range(num_rows)]


def _row_seed(row: dict) -> int:
    key = json.dumps(
        [prompt_text(row["prompt"]), row["instruction_id_list"], row["topic"]], sort_keys=True, default=str
    )
    return zlib.crc32(key.encode())


def plain_response(row: dict, seed: int | None = None) -> str:
    """An on-topic answer that ignores every instruction of `row`: the topic's lead sentence and up to two others.

    Args:
        row (`dict`): A row of the task (needs `topic`).
        seed (`int` or `None`, *optional*): Seed for the choice of sentences; by default derived from the row.

    Returns:
        `str`: the answer.
    """
    topic = TOPICS_BY_NAME[row["topic"]]
    rng = random.Random(_row_seed(row) if seed is None else seed)
    return " ".join([topic.sentences[0], *rng.sample(topic.sentences[1:], rng.choice((0, 1, 2)))])


def teacher_response(row: dict) -> str:
    """The expert's answer to `row`: on topic, following every instruction (deterministic for a given row).

    Layout, one part per line, each only if asked: `<<title>>`; the topic's lead sentence and, usually, the next
    sentence without a forbidden word (more to reach an `at least` word count, only the lead in capitals); exactly
    `num_bullets` bullets `* keyword`; a keyword sentence; the postscript; the end phrase. Then commas are removed, the
    case changed and the whole wrapped in quotes as asked. Where the case checkers' `langdetect` call or a word count
    decides, the shortest of a few deterministic alternatives that passes lm-eval's checker is returned.

    Args:
        row (`dict`): A row of the task (`topic`, `instruction_id_list`, `kwargs`).

    Returns:
        `str`: the answer.

    Raises:
        `ValueError`: if the row has an instruction outside [`INSTRUCTION_IDS`] or malformed kwargs.
    """
    topic = TOPICS_BY_NAME[row["topic"]]
    instruction_ids = list(row["instruction_id_list"])
    unknown = sorted(set(instruction_ids) - set(INSTRUCTION_IDS))
    if unknown:
        raise ValueError(f"The teacher only follows {INSTRUCTION_IDS}; the row asks for {unknown}.")
    arguments = dict(zip(instruction_ids, normalize_ifeval_kwargs(instruction_ids, row["kwargs"])))
    main = topic.keywords[0]
    forbidden = arguments.get(FORBIDDEN, {}).get("forbidden_words", [])
    fallback = [sentence.format(main=main) for sentence in _FALLBACK_SENTENCES]
    lead = topic.sentences[0]
    rest = [sentence for sentence in topic.sentences[1:] if not _contains_word(sentence, forbidden)]
    allowed_keywords = [keyword for keyword in topic.keywords if keyword not in forbidden]
    postscript = _POSTSCRIPT.format(name=topic.name)

    def parts(body: list[str], num_sentences: int) -> str:
        lines = []
        if TITLE in arguments:
            lines.append(f"<<{topic.title}>>")
        lines.append(" ".join(body[:num_sentences]))
        if BULLETS in arguments:
            lines.extend(f"* {keyword}" for keyword in allowed_keywords[: arguments[BULLETS]["num_bullets"]])
        if EXISTENCE in arguments:
            lines.append(_KEYWORD_SENTENCE.format(words=" and ".join(arguments[EXISTENCE]["keywords"])))
        if POSTSCRIPT in arguments:
            lines.append(f"{arguments[POSTSCRIPT]['postscript_marker']} {postscript}")
        if END_CHECKER in arguments:
            lines.append(arguments[END_CHECKER]["end_phrase"])
        text = "\n".join(lines)
        if NO_COMMA in arguments:
            text = text.replace(", ", " ").replace(",", "")
        if LOWERCASE in arguments:
            text = text.lower()
        elif CAPITAL in arguments:
            text = text.upper()
        if QUOTATION in arguments:
            text = f'"{text}"'
        return text

    verify = [
        instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        for instruction_id in (LOWERCASE, CAPITAL, NUMBER_WORDS)
        if instruction_id in arguments
    ]
    for checker in verify:
        checker.build_description(**arguments[checker.id])
    default_sentences = 1 if CAPITAL in arguments else 2
    if NUMBER_WORDS in arguments and arguments[NUMBER_WORDS]["relation"] == "less than":
        counts = [default_sentences] + [n for n in (1, 2, 3, 4) if n != default_sentences]
    else:
        counts = list(range(default_sentences, 8))
    # The lead sentence (named topic, a comma, no forbidden word) comes first; the other allowed sentences follow in
    # their order, rotated on later attempts, with plain fallback sentences last (or second, after six attempts:
    # langdetect is unreliable on short capitalised text).
    text = ""
    for num_sentences in counts:  # the shortest answer that passes
        for attempt in range(12):
            others = rest[attempt % len(rest) :] + rest[: attempt % len(rest)] if rest else []
            if attempt >= 6:
                others.insert(0, fallback[attempt % len(fallback)])
            body = [lead, *others, *(sentence for sentence in fallback if sentence not in others)]
            text = parts(body, num_sentences)
            if all(checker.check_following(text) for checker in verify):
                return text
            if not verify:
                break
    return text


def _heldout_flags(rng: random.Random, unseen_topic_rate: float, unseen_combination_rate: float) -> tuple[bool, bool]:
    return rng.random() < unseen_topic_rate, rng.random() < unseen_combination_rate


def make_splits(
    seed: int = 0,
    num_demonstrations: int = 256,
    num_preference: int = 512,
    num_eval: int = 400,
    unseen_topic_rate: float = 0.2,
    unseen_combination_rate: float = 0.2,
) -> DatasetDict:
    """Generate the task's seeded splits; no two rows of any splits share a prompt.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of all choices.
        num_demonstrations (`int`, *optional*, defaults to `256`): Rows of `demonstrations`.
        num_preference (`int`, *optional*, defaults to `512`): Rows of `preference`.
        num_eval (`int`, *optional*, defaults to `400`): Rows of `eval`.
        unseen_topic_rate (`float`, *optional*, defaults to `0.2`): Share of `eval` rows on [`HELDOUT_TOPICS`].
        unseen_combination_rate (`float`, *optional*, defaults to `0.2`): Share of `eval` rows with a pair of
            [`HELDOUT_COMBINATIONS`].

    Returns:
        [`~datasets.DatasetDict`] with splits (schemas in [`SPLIT_FEATURES`]):

        - `demonstrations`: `prompt` (`[{"role": "user", ...}]`), `completion` (`[{"role": "assistant", ...}]`, the
          teacher's answer), `instruction_id_list`, `kwargs`, `topic`, `topic_keywords`;
        - `preference`: `prompt`, `instruction_id_list`, `kwargs`, `topic`, `topic_keywords`;
        - `eval`: as `preference`, plus `expert_completion` (the teacher's answer, conversational), `unseen_topic` and
          `unseen_combination` (`bool`).
    """
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(topics: Sequence[Topic], unseen_combination: bool) -> dict:
        while True:
            row = sample_row(rng, topics, unseen_combination)
            text = prompt_text(row["prompt"])
            if text not in seen:
                seen.add(text)
                return row

    demonstrations = []
    for _ in range(num_demonstrations):
        row = draw(TRAIN_TOPICS, False)
        row["completion"] = [{"role": "assistant", "content": teacher_response(row)}]
        demonstrations.append(row)
    preference = [draw(TRAIN_TOPICS, False) for _ in range(num_preference)]
    evaluation = []
    for _ in range(num_eval):
        unseen_topic, unseen_combination = _heldout_flags(rng, unseen_topic_rate, unseen_combination_rate)
        row = draw(HELDOUT_TOPICS if unseen_topic else TRAIN_TOPICS, unseen_combination)
        row["expert_completion"] = [{"role": "assistant", "content": teacher_response(row)}]
        row["unseen_topic"] = unseen_topic
        row["unseen_combination"] = unseen_combination
        evaluation.append(row)
    return DatasetDict(
        {
            "demonstrations": Dataset.from_list(demonstrations, features=SPLIT_FEATURES["demonstrations"]),
            "preference": Dataset.from_list(preference, features=SPLIT_FEATURES["preference"]),
            "eval": Dataset.from_list(evaluation, features=SPLIT_FEATURES["eval"]),
        }
    )
