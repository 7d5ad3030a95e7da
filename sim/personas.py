"""Synthetic users for federated simulations: shared note habits, private facts, own styles.

A federation learns a shared prior from many users while each user keeps a personal
adapter, and a simulation should be able to show what each part buys. So every
synthetic user writes short daily notes for the same journaling app:

- **shared structure** a prior can learn: one set of sentence templates, the same kinds
  of everyday events and vocabulary, date headers in a handful of formats;
- **private facts** only the user's own adapter can learn: their partner's, friends'
  and pet's names, their town, employer, project, gym, cafe, commute, favourite food
  and a weekly habit on a fixed weekday, recurring across their notes;
- **a writing style**, one of :data:`STYLES`: lowercase and terse, chatty with
  exclamation marks, dated like a log with a sign-off, bullet lists, and so on.

Every name, place, company and sentence here was written for this module; all of it is
fiction. Everything is drawn from the raw output of a PCG64 generator keyed by
``(seed, user index)``, so user *i* is the same whether 8 or 1,000 users are generated,
on any machine and NumPy version. Held-out notes are new notes about the same facts,
never copies of training notes: each note body falls into a train or held-out pool by
a hash of its text, so the two can never share a note, however many are drawn, and
:func:`generate_notes` (extra training notes for cold-start runs) never yields a
held-out note either.

:func:`load_user_folders` reads real per-user folders in the same layout that
:func:`write_user_folders` writes, so a simulation can swap synthetic for real data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.errors import DataError, SpecError

if TYPE_CHECKING:  # client.data imports torch; load_user_folders imports it on first use
    from lorafleet.client.data import Example

__all__ = [
    "FACT_KEYS",
    "STYLES",
    "Persona",
    "PersonaConfig",
    "UserData",
    "generate_notes",
    "generate_personas",
    "load_user_folders",
    "write_user_folders",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_DOMAIN = b"lorafleet/sim/personas/v1\x00"
_MAX_USERS = 1_000_000
_MAX_NOTES = 10_000
_HELDOUT_POOL = 0.25  # share of possible note bodies reserved for held-out sets
_HELDOUT_CUT = int(_HELDOUT_POOL * 2**64)
_NOTE_FILES = ("train", "heldout")
_NOTE_SUFFIXES = (".txt", ".md", ".jsonl")
_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_INLINE_SPACE = re.compile(r"[^\S\n]+")
_PERSONA_FILE = "persona.json"

# ---------------------------------------------------------------------------- vocabulary
# Private vocabularies: a user draws one value of each, which then recurs in their notes.
# fmt: off

_FIRST_NAMES = (
    "Aarav", "Abebe", "Adaeze", "Aditi", "Agnes", "Aiko", "Alba", "Alejo", "Alina", "Amara",
    "Amir", "Anders", "Anouk", "Arjun", "Astrid", "Aurelio", "Ayla", "Baptiste", "Beatriz",
    "Benedek", "Bertil", "Bilal", "Birgit", "Bruna", "Caio", "Camille", "Casimir", "Cecily",
    "Chidi", "Chiara", "Cosmin", "Dagny", "Dalia", "Damir", "Darius", "Delphine", "Desmond",
    "Dilnoza", "Dmitri", "Edda", "Efua", "Eilif", "Elif", "Elodie", "Emeka", "Enzo", "Esme",
    "Estelle", "Evander", "Ezra", "Fabian", "Farida", "Fenna", "Ffion", "Filippo", "Folake",
    "Freya", "Gaspard", "Gideon", "Giulia", "Greta", "Gulnara", "Gunnar", "Hadley", "Halima",
    "Hamish", "Hana", "Hektor", "Helga", "Hiroshi", "Ignacio", "Ilse", "Imani", "Ingrid",
    "Isolde", "Ivo", "Jasper", "Javier", "Jolene", "Jovana", "Juno", "Kaito", "Kalani",
    "Katya", "Kemal", "Kenji", "Kirra", "Klara", "Kofi", "Laila", "Lars", "Leandro", "Leonie",
    "Lior", "Lisandro", "Liesel", "Lorcan", "Lucian", "Ludmila", "Lyra", "Mads", "Magnus",
    "Maren", "Marisol", "Matteo", "Mehmet", "Mirela", "Moana", "Nadir", "Naledi", "Nazanin",
    "Nikolai", "Nils", "Noor", "Odile", "Oisin", "Olamide", "Orla", "Osric", "Otto", "Paloma",
    "Pavel", "Petra", "Priya", "Quentin", "Rafael", "Ragna", "Ramon", "Ravi", "Reza", "Rhian",
    "Rosalind", "Rufus", "Saoirse", "Sanne", "Santiago", "Selin", "Seren", "Sigrid", "Silas",
    "Soren", "Sunniva", "Tamsin", "Taro", "Teodor", "Thandiwe", "Thea", "Tobias", "Tomasz",
    "Ulla", "Umar", "Ursula", "Valentina", "Vasco", "Vera", "Viggo", "Wanjiru", "Wilhelmina",
    "Xander", "Ximena", "Yannick", "Yara", "Yusuf", "Zainab", "Zara", "Zeno", "Zofia",
    "Zoltan", "Anzhela", "Bodhi", "Cyrus", "Dorota", "Eamon", "Fintan", "Ginevra", "Hallvard",
    "Idris", "Jurgen", "Kasia", "Leofric", "Malin", "Nnamdi", "Oona", "Perpetua", "Rasmus",
    "Svea", "Tadeo", "Urszula", "Wendeline", "Yevgenia", "Zubair", "Afonso", "Brigida",
    "Cormac", "Dervla", "Eskil", "Gwenllian", "Henrike", "Ines", "Jarrah", "Kwame",
)

_PET_NAMES = (
    "Biscuit", "Pickle", "Noodle", "Waffle", "Pretzel", "Crumpet", "Mochi", "Bramble",
    "Clementine", "Gherkin", "Parsnip", "Pudding", "Nutmeg", "Paprika", "Juniper",
    "Marzipan", "Fidget", "Pippin", "Bumble", "Doodle", "Sprocket", "Widget", "Gizmo",
    "Rascal", "Scampi", "Chutney", "Kipper", "Toffee", "Fudge", "Custard", "Truffle",
    "Wasabi", "Pesto", "Nacho", "Bagel", "Brioche", "Cobbler", "Dumpling", "Flapjack",
    "Ginger", "Haggis", "Jellybean", "Kumquat", "Pistachio", "Macaroon", "Nougat", "Oatcake",
    "Pancake", "Quince", "Rhubarb", "Sesame", "Tapioca", "Wonton", "Admiral Fluff",
    "Sir Wobbles", "Lady Crumble", "Captain Socks", "Professor Whiskers", "Duchess",
    "Bartholomew", "Cornelius", "Florentine", "Gwendolyn", "Horatio", "Ignatius",
    "Montgomery", "Percival", "Ptolemy", "Rumpus", "Sherbet", "Tinker", "Zigzag", "Bobbin",
    "Conker", "Dandelion", "Acorn", "Fennel", "Hazel", "Mossy", "Nettle", "Pebble",
    "Puddle", "Smudge", "Pumpernickel", "Splodge", "Whisker", "Wispy", "Bounce", "Dash",
    "Ziggy", "Wigglesworth", "Baron Fluffington", "Mister Pockets", "Tumbleweed", "Pixie",
    "Sprite", "Goblin",
    "Yeti", "Kraken", "Nessie", "Bigfoot", "Comet", "Nebula", "Quasar", "Pluto", "Orbit",
    "Rocket", "Cosmo", "Snickerdoodle", "Tofu", "Gumdrop", "Udon", "Edamame", "Wafer", "Bao",
)

_PET_KINDS = ("dog", "cat", "rabbit")

_TOWN_HEADS = (
    "Ashwyn", "Brackle", "Carrow", "Dunnel", "Elver", "Fallow", "Gorse", "Harrow", "Ilsing",
    "Kettle", "Larkin", "Marrow", "Nethel", "Orrin", "Pellow", "Quenby", "Ravel", "Sallow",
    "Tarn", "Umber", "Vellin", "Wendle", "Yarrow", "Aldring", "Bellis", "Coldra", "Dimble",
    "Evers", "Frith", "Glaven", "Hollin", "Istle", "Jessop", "Kelder", "Lowther", "Mistle",
    "Nunney", "Oxley", "Pennard", "Rook",
)
_TOWN_TAILS = (
    "mere", "ford", "wick", "by", "stow", "haven", "combe", "ton", "ley", "moor", "bridge",
    "field", "holt", "well", "thorpe", "den", "bury", "mouth", "cross", "gate",
)

_VENUE_WORDS = (
    "Basalt", "Gritstone", "Halyard", "Meridian", "Northgate", "Larchfield", "Kestrel",
    "Ochre", "Pinnacle", "Slatebank", "Tidewater", "Ironbridge", "Foxglove", "Greywell",
    "Heron Lane", "Ropewalk", "Keystone", "Lamplight", "Moorside", "Nightjar",
    "Oakhanger", "Pewter", "Quayside", "Riverbend", "Saltmarsh", "Thistle", "Upland",
    "Vantage", "Westcliff", "Yewtree", "Anvil", "Bellwether", "Cinder", "Driftwood",
    "Eastholme", "Fernbrook", "Granary", "Hilltop", "Inkwell", "Jetty",
)

_EMPLOYER_HEADS = (
    "Tessel", "Lumen", "Quillon", "Brightwater", "Halcyon", "Northwind", "Orrery",
    "Parallax", "Quillfeather", "Rowan", "Silverline", "Trellis", "Vireo", "Wayfarer",
    "Zephyr", "Arbor", "Beacon", "Cobalt", "Dovetail", "Everglow", "Fathom", "Gantry",
    "Helix", "Isobar", "Parkway", "Keel", "Lodestar", "Marigold", "Nimbus", "Obelisk",
    "Pennant", "Quire", "Radial", "Sextant", "Tundra", "Umbral", "Verity", "Windrose",
)
_EMPLOYER_TAILS = (
    "Logistics", "Labs", "Systems", "Analytics", "Health", "Insurance", "Robotics", "Press",
    "Energy", "Foods", "Studio", "Software", "Freight", "Design", "Biotech", "Games",
)

_PROJECT_HEADS = (
    "Blue", "Iron", "Silver", "Night", "Storm", "Cloud", "Glass", "Stone", "Sun", "Frost",
    "Ember", "Moon", "Star", "Sea", "Thunder", "Rain", "Dusk", "Dawn", "Snow", "Wind",
    "Gold", "Shadow", "Bright", "Swift",
)
_PROJECT_TAILS = (
    "finch", "kite", "fern", "wren", "moth", "lark", "otter", "badger", "heron", "marten",
    "falcon", "sparrow", "beetle", "salmon", "lynx", "pike", "raven", "swallow", "thrush",
    "vole", "weasel", "gecko", "hare", "tern",
)

_CAFE_HEADS = (
    "Velvet", "Crooked", "Sleepy", "Amber", "Wandering", "Painted", "Hollow", "Tipsy",
    "Little", "Curious", "Gilt", "Jolly", "Lucky", "Nimble", "Rusty", "Whistling",
    "Drowsy", "Merry", "Silent", "Tangled",
)
_CAFE_TAILS = (
    "Kettle", "Spoon", "Teapot", "Lantern", "Fox", "Hare", "Owl", "Anchor", "Ladle",
    "Thimble", "Badger", "Walrus", "Pelican", "Compass", "Spindle", "Bakehouse",
    "Pantry", "Larder", "Dresser", "Crumb",
)

_FOODS = (
    "lentil dal", "pumpkin gnocchi", "chickpea curry", "fish pie", "miso ramen",
    "potato pierogi", "shakshuka", "jollof rice", "bibimbap", "seafood paella",
    "halloumi wraps", "katsu curry", "pad thai", "moussaka", "beef goulash", "prawn laksa",
    "bean chilli", "falafel wraps", "pork tamales", "spinach pie", "black bean soup",
    "macaroni cheese", "chicken tagine", "vegetable lasagne", "egg fried rice", "pea risotto",
    "leek soup", "pork dumplings", "mushroom stroganoff", "aubergine parmigiana",
    "lamb kofta", "sweet potato curry", "cheese toasties", "stuffed peppers",
    "kimchi pancakes", "fish tacos", "fried plantain", "bean burritos", "carbonara",
    "sausage casserole", "cauliflower cheese", "gado-gado", "chana masala", "okonomiyaki",
    "borscht", "pho",
)

# fmt: on

_TRAM_LINES = ("red", "green", "orange", "violet", "yellow", "silver")

_SIBLING_RELS = ("sister", "brother", "cousin")

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_DAY_ABBR = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


@dataclass(frozen=True)
class _Habit:
    """A weekly activity: its name, venue kind and what a note says about a session."""

    name: str
    venue: str
    past: tuple[str, ...]
    event: tuple[str, ...]


_HABITS = (
    _Habit(
        "climbing",
        "Climbing Wall",
        ("Climbed", "Bouldered for two hours", "Finally topped the green overhang",
         "Fell off the same crimp all night"),
        ("bouldering league", "night of new routes"),
    ),
    _Habit(
        "swimming",
        "Lido",
        ("Swam forty lengths", "Did the long swim set", "Swam slow laps for an hour",
         "Practised tumble turns"),
        ("winter swim", "club gala"),
    ),
    _Habit(
        "running club",
        "Track",
        ("Ran hill repeats", "Did the tempo run", "Ran eight kilometres",
         "Ran intervals until my lungs gave up"),
        ("relay race", "midsummer five miler"),
    ),
    _Habit(
        "choir",
        "Community Choir",
        ("Sang the alto part all evening", "Rehearsed for the spring concert",
         "Learned two new harmonies", "Sang until my voice went"),
        ("carol concert", "summer recital"),
    ),
    _Habit(
        "pottery",
        "Clay Studio",
        ("Threw three wonky bowls", "Glazed the mugs from last week",
         "Finally centred the clay", "Trimmed a vase that collapsed"),
        ("open studio weekend", "pottery sale"),
    ),
    _Habit(
        "rowing",
        "Boat Club",
        ("Rowed at dawn", "Did a long erg session", "Rowed in the four",
         "Capsized in front of everyone"),
        ("head race", "club regatta"),
    ),
    _Habit(
        "yoga",
        "Yoga Loft",
        ("Did an hour of yoga", "Held crow pose for once", "Did the slow flow class",
         "Fell asleep in the final stretch"),
        ("weekend retreat", "sunrise session"),
    ),
    _Habit(
        "five-a-side",
        "Sports Hall",
        ("Played five-a-side", "Scored twice at five-a-side", "Played in goal all night",
         "Lost nine to two at five-a-side"),
        ("summer tournament", "charity match"),
    ),
    _Habit(
        "chess club",
        "Chess Club",
        ("Played four blitz games", "Lost a long endgame", "Drew against the club champion",
         "Won with a silly queen sacrifice"),
        ("rapid tournament", "simultaneous exhibition"),
    ),
    _Habit(
        "salsa class",
        "Dance Studio",
        ("Learned a new salsa turn", "Danced salsa for two hours",
         "Stepped on three toes at salsa", "Finally got the cross-body lead"),
        ("social dance night", "showcase"),
    ),
    _Habit(
        "boxing",
        "Boxing Gym",
        ("Did pad work for an hour", "Skipped rope until my calves burned",
         "Sparred three light rounds", "Hit the heavy bag until my arms shook"),
        ("fitness fundraiser", "open training night"),
    ),
)  # fmt: skip

_PET_ACTIONS = {
    "dog": (
        "Walked {pet} along the {path} before breakfast",
        "{pet} barked at a {object} for a full five minutes",
        "{pet} rolled in something awful by the {landmark}",
        "{pet} stole a {snack} off the counter and looked very proud",
        "Long {weather} walk with {pet}, who refused to go past the {landmark}",
        "{pet} chased a squirrel up the {landmark} and then sulked",
        "Took {pet} to puppy training again and the trainer sighed a lot",
    ),
    "cat": (
        "{pet} knocked a {object} off the shelf and watched me pick it up",
        "{pet} brought a leaf in through the cat flap as a present",
        "{pet} sat on my keyboard during a call again",
        "{pet} spent the whole {part_of_day} in the sunny spot by the window",
        "{pet} yelled for breakfast at five in the morning",
        "{pet} ignored the new cat bed and slept in a shoebox",
        "{pet} caught a moth and was insufferable about it",
    ),
    "rabbit": (
        "{pet} chewed through another phone cable",
        "{pet} did a little jump of joy in the hallway",
        "Cleaned out the hutch and gave {pet} fresh hay",
        "{pet} thumped at the hoover like it was a fox",
        "{pet} ate a whole pile of {produce} in one sitting",
        "Let {pet} run around the garden while I was {chore_ing}",
        "{pet} flopped over in the sun like a dropped sock",
    ),
}

# Shared vocabularies: every user draws from them note by note, so they are what the
# federation's prior can learn.
_SHARED: dict[str, tuple[str, ...]] = {
    "path": ("river path", "canal towpath", "old railway line", "seafront", "ring road",
             "woods behind the school", "beach", "cliff path"),
    "landmark": ("post box", "big oak", "bus shelter", "church gate", "footbridge",
                 "war memorial", "bandstand", "recycling bins"),
    "object": ("glass", "mug", "plant pot", "pen", "umbrella", "traffic cone",
               "shopping bag", "candle"),
    "snack": ("croissant", "sandwich", "sausage roll", "slice of toast", "banana",
              "cheese scone"),
    "weather": ("grey", "windy", "freezing", "muggy", "drizzly", "bright", "foggy"),
    "produce": ("leeks", "strawberries", "new potatoes", "carrots", "kale", "plums",
                "apples", "radishes", "beetroot", "pears", "broad beans", "spinach"),
    "chore": ("washing up", "laundry", "hoovering", "ironing", "recycling", "big shop",
              "bathroom", "bins", "bed sheets"),
    "chore_ing": ("sorting out the garden", "building a bookshelf", "clearing out the loft",
                  "painting the hallway", "fixing the shower", "repotting the plants",
                  "cleaning the oven", "tidying the shed"),
    "part_of_day": ("morning", "afternoon", "evening", "whole weekend"),
    "vet_result": ("needs a teeth clean", "a bit overweight", "a small cut on one paw",
                   "needs a change of food", "perfectly healthy and very dramatic"),
    "pet_item": ("bed", "toy", "blanket", "bowl", "harness"),
    "furniture": ("kitchen cupboard", "bathroom door", "treat drawer", "laundry basket",
                  "wardrobe"),
    "trivial": ("the right way to load the dishwasher", "whose turn it was to buy milk",
                "where the scissors live", "the thermostat", "the correct way to hang a towel",
                "which film we had already seen"),
    "takeaway": ("chips", "a pizza", "noodles", "kebabs", "a curry", "fried chicken"),
    "show": ("the baking show", "a detective drama", "that island dating show",
             "a nature documentary", "the quiz show", "a murder mystery"),
    "weekday": _WEEKDAYS[:5],
    "work_outcome": ("went better than expected", "crashed twice", "got pushed to next week",
                     "got a round of applause", "ran an hour long", "went fine, somehow"),
    "deadline": ("by Friday", "before the holidays", "yesterday, apparently",
                 "by the end of the sprint", "before the board meeting"),
    "bug": ("login bug", "memory leak", "date parsing bug", "flaky test", "caching bug",
            "off-by-one error", "timezone bug", "slow query"),
    "doc": ("design doc", "release notes", "onboarding guide", "incident report", "roadmap",
            "test plan"),
    "treat": ("cinnamon buns", "doughnuts", "a lemon cake", "homemade brownies", "samosas",
              "a tin of shortbread"),
    "meeting": ("Two hours of meetings", "A planning meeting", "A long retro",
                "An all-hands", "A budget review"),
    "gossip": ("we planned a trip to the coast", "we caught up on a month of news",
               "we complained about our landlords", "we made a pact to read more",
               "we talked for three hours straight", "we made a plan for the summer"),
    "menu_item": ("cardamom bun", "oat latte", "cheese toastie", "almond croissant",
                  "soup of the day", "plum tart"),
    "sibling_news": ("expecting a baby in the spring", "moving to a new flat",
                     "starting a new job", "training for a marathon",
                     "learning to drive at last", "thinking about a dog"),
    "errand": ("stamps", "a haircut", "new shoelaces", "a parcel", "light bulbs",
               "a birthday card"),
    "excuse": ("work ran late", "I had a cold", "it was pouring", "I forgot my kit",
               "I could not face it", "the car would not start"),
    "habit_feel": ("my arms are gone", "felt strong for once", "legs like jelly",
                   "best session in weeks", "everything hurts in a good way",
                   "left early and slept ten hours"),
    "delay": ("late", "cancelled", "packed", "twenty minutes late", "diverted",
              "stuck behind a tractor"),
    "mood": ("flat", "hopeful", "restless", "calm", "oddly cheerful", "a bit low",
             "proud of myself"),
    "sleep_reason": ("the wind kept rattling the window", "too hot to sleep",
                     "next door had a party", "my brain would not switch off",
                     "the heating clanked all night"),
    "book_thing": ("the crossword", "my library book", "the jigsaw", "the tax return",
                   "the thank-you cards"),
    "todo": ("call the dentist", "renew the car insurance", "buy more stamps",
             "defrost the freezer", "water the tomatoes", "return the library books",
             "book the boiler service", "reply to the landlord"),
    "bill": ("electricity", "water", "phone", "internet", "council tax"),
    "book_topic": ("the history of salt", "bees", "lighthouses", "deep sea creatures",
                   "old maps", "mushrooms", "the weather"),
}  # fmt: skip

# Sentence templates by topic. Fact slots come from the user's facts; the rest from
# _SHARED (or, for {pet_action}, {habit_past} and {habit_event}, from lists that depend
# on the user's pet kind and habit). A slot ending in "2" draws from the list without
# its "2" and differs from that slot's value.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "pet": (
        "{pet_action}.",
        "{pet_action}.",
        "{pet_action}.",
        "Took {pet} to the vet in {town}, the {pet_kind} is fine, just {vet_result}.",
        "{pet} slept on {partner}'s side of the bed all night.",
        "Bought {pet} a new {pet_item} and the {pet_kind} ignored it for the box it came in.",
        "{friend} came round and {pet} would not leave them alone.",
        "Worked from home with {pet} asleep on my feet, the best kind of office.",
        "{pet} has worked out how to open the {furniture}, so that is our life now.",
    ),
    "partner": (
        "{partner} made {food} for dinner and it was the best thing I ate all week.",
        "Date night with {partner} at the {cafe}, we stayed until they stacked the chairs.",
        "{partner} and I spent the {part_of_day} {chore_ing}.",
        "Argued with {partner} about {trivial}, then made {food} and forgot all about it.",
        "{partner} picked me up from {gym} and we got {takeaway} on the way home.",
        "Watched two episodes of {show} with {partner}, then bed.",
        "{partner} is away for work until {weekday}, the flat is very quiet.",
        "Cooked {food} for {partner}'s parents and they all had seconds.",
        "{partner} found a {object} at the charity shop in {town} and now it lives on our table.",
    ),
    "work": (
        "Long day at {employer}, the {project} demo {work_outcome}.",
        "Standup ran over again because {colleague} wants {project} done {deadline}.",
        "Paired with {colleague} on {project} all afternoon and we finally fixed the {bug}.",
        "Fixed the {bug} in {project} that has been haunting me since {weekday}.",
        "{colleague} brought {treat} to the {employer} office, morale is up.",
        "Wrote the {doc} for {project} and sent it to {colleague} for review.",
        "Quarterly planning at {employer}, {project} is officially the priority now.",
        "Took {commute} into the {employer} office and read the whole way.",
        "{meeting} about {project} that could have been an email.",
        "{colleague} is off sick so I am covering the {project} releases this week.",
        "Shipped a small {project} release before lunch and nothing caught fire.",
    ),
    "habit": (
        "{habit_past} at {gym} with {friend}.",
        "{habit_day} means {habit} at {gym}, {habit_feel}.",
        "{habit_past} at {gym} tonight, {habit_feel}.",
        "{friend} talked me into the {habit_event} at {gym}.",
        "Back at {gym} for {habit} after a week off, {habit_feel}.",
        "Coffee at the {cafe} with {friend} after {habit}.",
    ),
    "habit_off": ("Skipped {habit} at {gym} this week because {excuse}.",),
    "town": (
        "Coffee at the {cafe} with {friend}, {gossip}.",
        "The {cafe} has a new {menu_item} and I had two.",
        "Power cut across half of {town} this evening, we ate {takeaway} by candlelight.",
        "Cycled out of {town} along the {path} and got rained on the whole way back.",
        "{friend} is moving away from {town} next month and I am not okay about it.",
        "Bin day in {town} and of course I missed it again.",
        "{friend} and I tried the new place in {town}, it is no {cafe}.",
        "Walked into {town} for {errand} and ended up at the {cafe} for an hour.",
    ),
    "family": (
        "My {sibling_rel} {sibling} came down to {town} for the weekend.",
        "Long call with my {sibling_rel} {sibling}, who is {sibling_news}.",
        "My {sibling_rel} {sibling} rang to ask about {pet} before asking about me.",
        "Helped my {sibling_rel} {sibling} carry a sofa up three flights of stairs.",
        "Lunch with my {sibling_rel} {sibling}, who still owes me a tenner.",
        "It is my {sibling_rel} {sibling}'s birthday on {weekday}, must buy a card.",
    ),
    "market": ("Market day in {town}, came home with {produce} and {produce2}.",),
    "food": (
        "Made {food} from scratch, it took all evening but it was worth it.",
        "Craving {food} all day, so that is dinner sorted.",
        "Batch-cooked {food} for the week and the freezer is full.",
        "Tried to teach {friend} how I make {food} and they burned the pan.",
    ),
    "commute": (
        "{commute} was {delay} again, so I was late for standup at {employer}.",
        "Read half a book on {commute} this morning.",
        "Missed {commute} by ten seconds and waited in the {weather} cold.",
    ),
    "generic": (
        "Slept badly, {sleep_reason}.",
        "Did the {chore} and then the {chore2}.",
        "Early night.",
        "Feeling {mood} today.",
        "It rained all {part_of_day}.",
        "Finally finished {book_thing}.",
        "Too tired to cook, had toast for dinner.",
        "Drank too much coffee and regretted it by three.",
        "Need to remember to {todo} tomorrow.",
        "Spent an hour {chore_ing} and it still looks the same.",
        "Phone died at lunch and it was weirdly nice.",
        "Went to bed at ten like a proper adult.",
        "The weather was {weather} so I stayed in.",
        "Paid the {bill} bill, grown-up points earned.",
        "Started a new book about {book_topic}.",
        "Note to self: {todo}.",
    ),
}

# How often a note's first sentence is about each topic (habits and market days are
# tied to weekdays and handled separately). Every first sentence names a private fact.
_TOPIC_WEIGHTS = (("pet", 5), ("partner", 5), ("work", 6), ("town", 4), ("family", 2), ("food", 2),
                  ("commute", 2), ("habit_off", 1))  # fmt: skip
_TOPICS = tuple(t for t, w in _TOPIC_WEIGHTS for _ in range(w))
_FACT_TOPICS = tuple(t for t in _TOPICS if t != "habit_off")


def _slots(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


_TEMPLATE_SLOTS = {
    t: _slots(t) for group in (*_TEMPLATES.values(), *_PET_ACTIONS.values()) for t in group
}

# ---------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class _Style:
    """A way of writing a note: header, length, punctuation and sign-off habits."""

    sentences: tuple[int, ...]  # drawn uniformly: how many sentences a note has
    lowercase: bool = False
    terse: bool = False  # drop a leading "I", "with" -> "w/", "and" -> "&", no final stop
    exclaim: float = 0.0  # chance that a sentence ends in "!" rather than "."
    ellipsis: bool = False  # sentences trail off with "..."
    bullets: bool = False  # one "- " line per sentence under the header
    aside: float = 0.0  # chance of a short aside sentence at the end
    signoff: str = ""  # appended to every note; "{name}" is the writer's first name


_STYLES: Mapping[str, _Style] = MappingProxyType(
    {
        "plain": _Style(sentences=(1, 2, 2)),
        "terse": _Style(sentences=(1, 2), lowercase=True, terse=True),
        "chatty": _Style(sentences=(2, 2, 3), exclaim=0.4, aside=0.5, signoff=" xx"),
        "log": _Style(sentences=(2,), signoff=" — {name}"),
        "dreamy": _Style(sentences=(1, 2, 3), lowercase=True, ellipsis=True),
        "bullets": _Style(sentences=(2, 3), bullets=True),
    }
)

STYLES = tuple(_STYLES)
"""Names of the writing styles a persona is drawn from, uniformly."""

_ASIDES = ("What a day.", "Love that.", "Anyway.", "So good.", "Honestly.", "Classic.")

FACT_KEYS = (
    "name", "partner", "friend", "colleague", "sibling", "sibling_rel", "pet", "pet_kind",
    "town", "habit", "habit_day", "gym", "employer", "project", "cafe", "food", "commute",
)  # fmt: skip
"""Keys of :attr:`Persona.facts`, in order."""


def _header(style: str, day: dt.date) -> str:
    """The date header the style writes, e.g. ``Tue 14 Mar —`` or ``2024-03-14:``."""
    wd = day.weekday()
    if style == "plain":
        return f"{_DAY_ABBR[wd]} {day.day} {_MONTHS[day.month - 1][:3]} —"
    if style == "terse":
        return f"{day.day:02d}/{day.month:02d}"
    if style == "chatty":
        return f"{_WEEKDAYS[wd]}, {day.day} {_MONTHS[day.month - 1]}."
    if style == "log":
        return f"{day.isoformat()}:"
    if style == "dreamy":
        return f"{_WEEKDAYS[wd].lower()}."
    return f"{day.day} {_MONTHS[day.month - 1][:3]}"  # bullets: header on its own line


# ---------------------------------------------------------------------------- randomness


class _Draws:
    """Deterministic draws from the raw 64-bit output of PCG64.

    NumPy keeps the raw stream of its bit generators (and SeedSequence) fixed across
    versions (NEP 19) but not the output of its distribution methods, so integers are
    mapped here with exact integer arithmetic only.
    """

    __slots__ = ("_bits", "_it")

    def __init__(self, *key: object) -> None:
        digest = hashlib.sha256(_DOMAIN + repr(key).encode()).digest()
        self._bits = np.random.PCG64(int.from_bytes(digest[:16], "little"))
        self._it: Iterator[int] = iter(())

    def _refill(self) -> int:
        raw: list[int] = np.asarray(self._bits.random_raw(1024), dtype=np.uint64).tolist()
        self._it = iter(raw)
        return next(self._it)

    def below(self, n: int) -> int:
        """Uniform in ``0..n-1`` (multiply-shift; bias below 2**-50 for small n)."""
        x = next(self._it, None)
        return ((self._refill() if x is None else x) * n) >> 64

    def pick(self, seq: Sequence[_T]) -> _T:
        x = next(self._it, None)
        return seq[((self._refill() if x is None else x) * len(seq)) >> 64]

    def chance(self, p: float) -> bool:
        x = next(self._it, None)
        return (self._refill() if x is None else x) < int(p * 2**64)

    def sample(self, seq: Sequence[_T], k: int) -> list[_T]:
        """``k`` distinct items, by a partial Fisher-Yates shuffle."""
        items = list(seq)
        for i in range(k):
            j = i + self.below(len(items) - i)
            items[i], items[j] = items[j], items[i]
        return items[:k]


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PersonaConfig:
    """How many synthetic users to make, how many notes each, and from which seed.

    Examples
    --------
    >>> PersonaConfig(num_users=4, notes_per_user=60).num_heldout
    12
    """

    num_users: int = 8
    notes_per_user: int = 120
    heldout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("num_users", self.num_users, 1, _MAX_USERS)
        _check_int("notes_per_user", self.notes_per_user, 2, _MAX_NOTES)
        f = self.heldout_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1:
            raise SpecError(f"persona config: heldout_fraction must be in (0, 1), got {f!r}")
        if not 1 <= self.num_heldout < self.notes_per_user:
            raise SpecError(
                f"persona config: heldout_fraction={f!r} of notes_per_user="
                f"{self.notes_per_user} holds out {self.num_heldout} notes; raise "
                "notes_per_user or pick a fraction that leaves at least one note on each side"
            )
        _check_int("seed", self.seed, 0, 2**63 - 1)

    @property
    def num_heldout(self) -> int:
        """Held-out notes per user: ``round(notes_per_user * heldout_fraction)``."""
        return round(self.notes_per_user * self.heldout_fraction)

    @property
    def num_train(self) -> int:
        """Training notes per user: the rest."""
        return self.notes_per_user - self.num_heldout


def _check_int(
    name: str, value: object, low: int, high: int, where: str = "persona config"
) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{where}: {name} must be an integer in {low}..{high}, got {value!r}")


# ---------------------------------------------------------------------------- personas


@dataclass(frozen=True)
class Persona:
    """One synthetic user: private facts, a writing style, and their notes.

    Attributes
    ----------
    user_id
        Pseudonymous id, ``u<index>-<6 hex>``; the hash binds it to the seed, so ids of
        different seeds differ (but for a one in 16 million chance). Also the user's folder name on disk.
    facts
        The private facts, keyed by :data:`FACT_KEYS` (read-only).
    style
        One of :data:`STYLES` for a generated persona.
    train, heldout
        The notes, disjoint: no held-out note body also appears in training.

    Examples
    --------
    >>> p = generate_personas(PersonaConfig(num_users=1, notes_per_user=10))[0]
    >>> p.user_id.startswith("u0000-"), len(p.train), len(p.heldout)
    (True, 8, 2)
    """

    user_id: str
    facts: Mapping[str, str]
    style: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.user_id, str) or not _USER_ID.match(self.user_id):
            raise DataError(
                f"persona: user_id {self.user_id!r} is not usable as a folder name; use "
                "letters, digits, '.', '_' and '-' (not starting with '.' or '-')"
            )
        object.__setattr__(self, "facts", MappingProxyType(dict(self.facts)))
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "heldout", tuple(self.heldout))
        for side in ("train", "heldout"):
            for i, note in enumerate(getattr(self, side)):
                if not isinstance(note, str):
                    raise DataError(
                        f"persona {self.user_id}: {side} note {i} must be a string, "
                        f"got {type(note).__name__}"
                    )


def _user_id(seed: int, index: int) -> str:
    tag = hashlib.sha256(_DOMAIN + b"id\x00" + f"{seed}:{index}".encode()).hexdigest()[:6]
    return f"u{index:04d}-{tag}"


def _make_facts(seed: int, index: int) -> tuple[dict[str, str], str]:
    """The private facts and style of user ``index``; independent of every other user."""
    r = _Draws("facts", seed, index)
    name, partner, friend, colleague, sibling = r.sample(_FIRST_NAMES, 5)
    habit = r.pick(_HABITS)
    habit_day = _WEEKDAYS[r.below(5)]  # evenings after work; weekends have the market
    commute_kind = r.below(4)
    if commute_kind == 0:
        commute = f"the number {2 + r.below(98)} bus"
    elif commute_kind == 1:
        commute = f"the {_TRAM_LINES[r.below(len(_TRAM_LINES))]} line tram"
    else:
        vehicle = "train" if commute_kind == 2 else "ferry"
        commute = f"the {6 + r.below(3)}:{r.below(60):02d} {vehicle}"
    facts = {
        "name": name,
        "partner": partner,
        "friend": friend,
        "colleague": colleague,
        "sibling": sibling,
        "sibling_rel": r.pick(_SIBLING_RELS),
        "pet": r.pick(_PET_NAMES),
        "pet_kind": r.pick(_PET_KINDS),
        "town": r.pick(_TOWN_HEADS) + r.pick(_TOWN_TAILS),
        "habit": habit.name,
        "habit_day": habit_day,
        "gym": f"{r.pick(_VENUE_WORDS)} {habit.venue}",
        "employer": f"{r.pick(_EMPLOYER_HEADS)} {r.pick(_EMPLOYER_TAILS)}",
        "project": r.pick(_PROJECT_HEADS) + r.pick(_PROJECT_TAILS),
        "cafe": f"{r.pick(_CAFE_HEADS)} {r.pick(_CAFE_TAILS)}",
        "food": r.pick(_FOODS),
        "commute": commute,
    }
    assert tuple(facts) == FACT_KEYS
    return facts, r.pick(STYLES)


class _Writer:
    """Draws the notes of one persona from one named stream."""

    def __init__(self, facts: Mapping[str, str], style: str, draws: _Draws) -> None:
        self.style_name = style
        self.style = _STYLES[style]
        self.r = draws
        habit = next(h for h in _HABITS if h.name == facts["habit"])
        self.habit_weekday = _WEEKDAYS.index(facts["habit_day"])
        self.table: dict[str, Sequence[str]] = dict(_SHARED)
        self.table.update({k: (v,) for k, v in facts.items()})
        self.table["pet_action"] = _PET_ACTIONS[facts["pet_kind"]]
        self.table["habit_past"] = habit.past
        self.table["habit_event"] = habit.event
        self.signoff = self.style.signoff.replace("{name}", facts["name"])
        self.day = dt.date(2023, 1, 1) + dt.timedelta(days=self.r.below(365))

    def _fill(self, template: str) -> str:
        values: dict[str, str] = {}
        for slot in _TEMPLATE_SLOTS[template]:
            if slot in values:
                continue
            if slot.endswith("2") and slot[:-1] in self.table:
                options = self.table[slot[:-1]]
                value = self.r.pick(options)
                while value == values.get(slot[:-1]):
                    value = self.r.pick(options)
            else:
                value = self.r.pick(self.table[slot])
            if "{" in value:  # a {pet_action} names the pet and other slots itself
                value = self._fill(value)
            values[slot] = value
        text = template.format_map(values)
        return text[0].upper() + text[1:]

    def _topic(self, first: bool) -> str:
        wd = self.day.weekday()
        if first:
            if wd == self.habit_weekday and self.r.chance(0.7):
                return "habit"
            if wd == 5 and self.r.chance(0.4):
                return "market"
            return self.r.pick(_TOPICS)
        if self.r.chance(0.5):
            return "generic"
        return self.r.pick(_FACT_TOPICS)

    def next_body(self) -> tuple[str, tuple[str, ...]]:
        """Advance the calendar and draw the sentences of one note: ``(key, sentences)``."""
        self.day += dt.timedelta(days=1 + (self.r.below(3) == 0))
        count = self.r.pick(self.style.sentences)
        sentences: list[str] = []
        for i in range(count):
            group = _TEMPLATES[self._topic(first=i == 0)]
            sentence = self._fill(self.r.pick(group))
            if sentence not in sentences:
                sentences.append(sentence)
        return "\n".join(sentences), tuple(sentences)

    def render(self, sentences: Sequence[str]) -> str:
        """Write the sentences in the persona's style under a date header."""
        s = self.style
        out: list[str] = []
        for sentence in sentences:
            if s.terse:
                sentence = sentence.removeprefix("I ").replace(" with ", " w/ ")
                sentence = sentence.replace(" and ", " & ").rstrip(".")
            elif s.ellipsis:
                sentence = sentence[:-1] + "..."
            elif s.exclaim and self.r.chance(s.exclaim):
                sentence = sentence[:-1] + "!"
            if s.bullets:
                sentence = "- " + sentence.rstrip(".")
            out.append(sentence)
        if s.aside and self.r.chance(s.aside):
            out.append(self.r.pick(_ASIDES))
        header = _header(self.style_name, self.day)
        if s.bullets:
            text = header + "\n" + "\n".join(out)
        else:
            text = header + " " + (". " if s.terse else " ").join(out) + self.signoff
        return text.lower() if s.lowercase else text


def _pool_is_heldout(salt: bytes, key: str) -> bool:
    """Whether a note body belongs to the held-out pool (a fixed 25% of all bodies)."""
    h = hashlib.blake2b(salt + key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < _HELDOUT_CUT


def _draw_notes(
    writer: _Writer, salt: bytes, want_train: int, want_heldout: int, where: str
) -> tuple[list[str], list[str]]:
    """Draw note bodies until each pool has enough distinct ones; render those kept."""
    train: list[str] = []
    heldout: list[str] = []
    seen: set[str] = set()
    budget = 50 * (want_train + want_heldout) + 1_000
    while len(train) < want_train or len(heldout) < want_heldout:
        budget -= 1
        if budget < 0:
            raise SpecError(
                f"{where}: cannot draw {want_train + want_heldout} distinct notes for one "
                "user; ask for fewer notes per user"
            )
        key, sentences = writer.next_body()
        if key in seen:
            continue
        seen.add(key)
        pool = heldout if _pool_is_heldout(salt, key) else train
        if len(pool) < (want_heldout if pool is heldout else want_train):
            pool.append(writer.render(sentences))
    return train, heldout


def _persona(config: PersonaConfig, index: int) -> Persona:
    facts, style = _make_facts(config.seed, index)
    writer = _Writer(facts, style, _Draws("notes", config.seed, index))
    salt = _pool_salt(config.seed, index)
    train, heldout = _draw_notes(
        writer, salt, config.num_train, config.num_heldout, f"persona config: user {index}"
    )
    return Persona(_user_id(config.seed, index), facts, style, tuple(train), tuple(heldout))


def _pool_salt(seed: int, index: int) -> bytes:
    return _DOMAIN + b"pool\x00" + f"{seed}:{index}\x00".encode()


def generate_personas(config: PersonaConfig) -> list[Persona]:
    """Generate ``config.num_users`` synthetic users, deterministically.

    User *i* depends only on ``(config.seed, i, notes_per_user, heldout_fraction)``, so
    the first 8 of 100 users are exactly the 8 users of a run with ``num_users=8``, and
    asking for more notes per user only appends notes (the first *k* training notes
    stay the same).

    Parameters
    ----------
    config
        How many users and notes, the held-out share and the seed.

    Returns
    -------
    list[Persona]
        In index order; user ids ``u0000-...``, ``u0001-...``, and so on.

    Examples
    --------
    >>> users = generate_personas(PersonaConfig(num_users=3, notes_per_user=20, seed=7))
    >>> [len(u.train) for u in users], users[0].facts["pet"] in " ".join(users[0].train)
    ([16, 16, 16], True)
    """
    if not isinstance(config, PersonaConfig):
        raise SpecError(f"generate_personas needs a PersonaConfig, got {type(config).__name__}")
    personas = [_persona(config, i) for i in range(config.num_users)]
    logger.debug("generated %d personas (seed %d)", len(personas), config.seed)
    return personas


def generate_notes(user_index: int, n: int, *, seed: int = 0) -> list[str]:
    """More training notes by persona ``user_index`` of ``seed``, for cold-start runs.

    The notes share the persona's facts and style but come from a stream of their own,
    and none is ever a note body of the persona's held-out set (whatever
    ``notes_per_user`` and ``heldout_fraction`` made it), so the persona's held-out
    notes stay a fair test. They may now and then repeat one of the persona's training
    notes, as people do. The first *k* of ``n`` notes do not depend on ``n``, so
    cold-start curves over k = 4, 16, 64 use nested sets.

    Parameters
    ----------
    user_index
        Which persona (0-based), as in :func:`generate_personas`.
    n
        How many notes, 0 to 10,000.
    seed
        The :class:`PersonaConfig` seed of the persona.

    Returns
    -------
    list[str]
        ``n`` distinct notes.

    Examples
    --------
    >>> notes = generate_notes(3, 16)
    >>> len(notes), generate_notes(3, 4) == notes[:4]
    (16, True)
    """
    _check_int("user_index", user_index, 0, _MAX_USERS - 1, "generate_notes")
    _check_int("n", n, 0, _MAX_NOTES, "generate_notes")
    _check_int("seed", seed, 0, 2**63 - 1, "generate_notes")
    facts, style = _make_facts(seed, user_index)
    writer = _Writer(facts, style, _Draws("extra", seed, user_index))
    writer.day += dt.timedelta(days=730)  # later than the persona's own notes
    train, _ = _draw_notes(
        writer, _pool_salt(seed, user_index), n, 0, f"generate_notes: user {user_index}"
    )
    return train


# ---------------------------------------------------------------------------- folders


def _check_note_file_safe(user_id: str, side: str, i: int, note: str) -> None:
    """A note must survive the .txt notes format unchanged (see client.data.read_examples)."""
    lines = note.split("\n")
    clean = all(line and _INLINE_SPACE.sub(" ", line).strip() == line for line in lines)
    if not clean or "\r" in note or note.startswith("#"):
        raise DataError(
            f"persona {user_id}: {side} note {i} would not read back unchanged from a .txt "
            "file (blank lines, runs of spaces, edge spaces or a leading '#'); clean it up"
        )


def write_user_folders(personas: Iterable[Persona], root: Path) -> Path:
    """Write each persona as ``root/<user_id>/`` with ``train.txt`` and ``heldout.txt``.

    Notes are separated by blank lines, the format :func:`lorafleet.client.data.read_examples`
    reads, under a ``#`` comment saying the data is synthetic. ``persona.json`` beside
    them keeps the facts and style for analysis; :func:`load_user_folders` ignores it.
    Every file is written to a temporary sibling and renamed into place, so a killed run
    never leaves half a file. Folders of the same user ids are overwritten (a seed
    always regenerates the same data); folders of other users are refused, so two
    generations are never mixed by accident.

    Parameters
    ----------
    personas
        From :func:`generate_personas`.
    root
        Created if missing.

    Returns
    -------
    Path
        ``root``.

    Raises
    ------
    DataError
        Duplicate user ids, a note that would not read back unchanged, or ``root``
        already holds other users' folders.

    Examples
    --------
    >>> import tempfile
    >>> users = generate_personas(PersonaConfig(num_users=2, notes_per_user=10))
    >>> root = write_user_folders(users, Path(tempfile.mkdtemp()) / "users")
    >>> sorted(p.name for p in (root / users[0].user_id).iterdir())
    ['heldout.txt', 'persona.json', 'train.txt']
    """
    root = Path(root)
    people = list(personas)
    ids = {p.user_id for p in people}
    if len(ids) != len(people):
        names = [p.user_id for p in people]
        dup = next(i for i in names if names.count(i) > 1)
        raise DataError(f"user id {dup!r} appears twice; pass each persona once")
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder; choose another root")
    if root.is_dir():
        foreign = sorted(
            c.name for c in root.iterdir() if not c.name.startswith(".") and c.name not in ids
        )
        if foreign:
            raise DataError(
                f"{root}: already holds {len(foreign)} entries that are not these users' "
                f"folders ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); write "
                "to an empty folder so users of different runs are not mixed"
            )
    for p in people:
        for side in _NOTE_FILES:
            for i, note in enumerate(getattr(p, side)):
                _check_note_file_safe(p.user_id, side, i, note)
    for p in people:
        folder = root / p.user_id
        for side in _NOTE_FILES:
            notes: tuple[str, ...] = getattr(p, side)
            head = f"# lorafleet synthetic persona {p.user_id}: {side} notes (all invented)"
            atomic_write_text(folder / f"{side}.txt", "\n\n".join((head, *notes)) + "\n")
        meta = {
            "user_id": p.user_id,
            "style": p.style,
            "facts": dict(p.facts),
            "num_train": len(p.train),
            "num_heldout": len(p.heldout),
        }
        atomic_write_text(folder / _PERSONA_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %d user folders under %s", len(people), root)
    return root


@dataclass(frozen=True)
class UserData:
    """One user's examples, split into training and held-out sets.

    Examples
    --------
    >>> from lorafleet.client.data import Example
    >>> UserData("u1", [Example(text="a")], [Example(text="b")]).user_id
    'u1'
    """

    user_id: str
    train: list[Example]
    heldout: list[Example]


def load_user_folders(
    root: Path, *, heldout_fraction: float = 0.2, seed: int = 0
) -> list[UserData]:
    """Read one user per subfolder of ``root``: synthetic personas or real people's notes.

    A user folder holds either a train file and a held-out file (``train.txt`` and
    ``heldout.txt``, or ``.md`` / ``.jsonl``; the layout :func:`write_user_folders`
    writes), used as given, or any ``.txt``, ``.md`` and ``.jsonl`` files (searched
    recursively), which are read together and split with
    :func:`lorafleet.client.data.split_examples`; that split is deterministic and stays
    put as notes are added.

    Parameters
    ----------
    root
        A folder of user folders; the folder name is the user id. Hidden entries are
        skipped, loose files in ``root`` ignored with a warning.
    heldout_fraction, seed
        For folders that are split here.

    Returns
    -------
    list[UserData]
        Sorted by user id.

    Raises
    ------
    DataError
        ``root`` missing or holding no user folders, a user folder with no notes or too
        few to split, a train file without its held-out file, or any file that
        :func:`lorafleet.client.data.read_examples` rejects; the message names the path.

    Examples
    --------
    >>> import tempfile
    >>> users = generate_personas(PersonaConfig(num_users=2, notes_per_user=10))
    >>> root = write_user_folders(users, Path(tempfile.mkdtemp()) / "users")
    >>> [(u.user_id == p.user_id, len(u.train)) for u, p in zip(load_user_folders(root), users)]
    [(True, 8), (True, 8)]
    """
    from lorafleet.client.data import read_examples, split_examples

    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder; point at a folder with one subfolder per user")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; point at a folder with one subfolder per user")
    entries = sorted(c for c in root.iterdir() if not c.name.startswith("."))
    folders = [c for c in entries if c.is_dir()]
    loose = [c.name for c in entries if not c.is_dir()]
    if loose:
        logger.warning(
            "ignoring %d file(s) directly under %s (each user needs a folder): %s",
            len(loose),
            root,
            ", ".join(loose[:5]) + (" ..." if len(loose) > 5 else ""),
        )
    if not folders:
        raise DataError(
            f"{root}: no user folders; put each user's notes in {root}/<user_id>/ "
            "(train.txt and heldout.txt, or any .txt, .md or .jsonl files)"
        )
    users: list[UserData] = []
    for folder in folders:
        sides = {side: _find_side(folder, side) for side in _NOTE_FILES}
        if sides["train"] is not None or sides["heldout"] is not None:
            missing = [side for side, path in sides.items() if path is None]
            if missing:
                present = next(path for path in sides.values() if path is not None)
                raise DataError(
                    f"{folder}: has {present.name} but no {missing[0]}.txt; add it, or rename "
                    f"{present.name} so the folder's notes are split automatically"
                )
            train_path, heldout_path = sides["train"], sides["heldout"]
            assert train_path is not None and heldout_path is not None
            others = [
                c.name
                for c in sorted(folder.iterdir())
                if c.suffix.lower() in _NOTE_SUFFIXES
                and c not in (train_path, heldout_path)
                and not c.name.startswith(".")
            ]
            if others:
                logger.warning(
                    "%s: using %s and %s; ignoring %s",
                    folder,
                    train_path.name,
                    heldout_path.name,
                    ", ".join(others),
                )
            # Files written in the notes format: one note may span lines (no auto-split).
            train = read_examples(train_path, split="paragraphs")
            heldout = read_examples(heldout_path, split="paragraphs")
            _warn_if_leaky(folder, train, heldout)
        else:
            examples = read_examples(folder)
            try:
                train, heldout = split_examples(examples, heldout_fraction, seed=seed)
            except DataError as exc:
                raise DataError(f"{folder}: {exc}") from None
        users.append(UserData(folder.name, train, heldout))
    logger.info("loaded %d users from %s", len(users), root)
    return users


def _find_side(folder: Path, side: str) -> Path | None:
    found = [folder / (side + s) for s in _NOTE_SUFFIXES if (folder / (side + s)).is_file()]
    if len(found) > 1:
        raise DataError(
            f"{folder}: has {' and '.join(p.name for p in found)}; keep one {side} file"
        )
    return found[0] if found else None


def _warn_if_leaky(folder: Path, train: Sequence[Example], heldout: Sequence[Example]) -> None:
    seen = {e.content_key() for e in train}
    leaked = sum(e.content_key() in seen for e in heldout)
    if leaked:
        logger.warning(
            "%s: %d held-out example(s) also appear in train; held-out loss will be optimistic",
            folder,
            leaked,
        )
