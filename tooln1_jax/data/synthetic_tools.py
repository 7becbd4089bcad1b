"""The catalog of synthetic tools: parameter kinds, value pools and query templates.

Each `Tool` has an xLAM-style schema, a family (look-alike siblings such as `get_weather` and
`get_weather_forecast` share one) and query templates; each `Param` samples a value and renders
it into the query. `tooln1_jax.data.synthetic` draws problems from `TOOLS`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

ARG_TYPES = ("string", "enum", "integer", "number", "boolean", "list")

# xLAM writes Python-ish type names; an optional parameter gets ", optional" and a default.
_XLAM_TYPE = {
    "string": "str",
    "enum": "str",
    "integer": "int",
    "number": "float",
    "boolean": "bool",
    "list": "List[str]",
}

_CITIES = (
    "Paris",
    "London",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Rome",
    "Cairo",
    "Lima",
    "Oslo",
    "Dublin",
    "Vienna",
    "Prague",
    "Seoul",
    "Delhi",
    "Sydney",
    "Toronto",
    "Boston",
    "Denver",
    "Miami",
    "Austin",
)
_PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "maple",
    "ocean",
    "piano",
    "garden",
    "silver",
    "rocket",
    "forest",
    "candle",
    "winter",
    "summer",
    "bridge",
    "meadow",
    "thunder",
    "velvet",
    "harbor",
)
_DISHES = ("pasta", "curry", "salad", "soup", "tacos", "pizza", "risotto", "noodles", "pancakes", "stew")
_CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR")
_GENRES = ("jazz", "rock", "pop", "blues", "classical", "metal", "folk", "disco")


@dataclasses.dataclass(frozen=True)
class Param:
    """One tool parameter. `sample(rng)` draws a value; `phrases` render it into the query.

    `phrases` are format strings with `{v}` for the rendered value. For booleans, `phrases` maps
    each truth value to its wording instead. Optional parameters get `default` in the schema.
    """

    name: str
    kind: str  # one of ARG_TYPES
    description: str
    sample: Callable[[random.Random], Any]
    phrases: Any = ("{v}",)
    optional: bool = False
    default: Any = None

    def schema(self) -> dict:
        out = {"type": _XLAM_TYPE[self.kind] + (", optional" if self.optional else ""), "description": self.description}
        if self.optional:
            out["default"] = self.default
        return out

    def render(self, value: Any, rng: random.Random) -> str:
        if self.kind == "boolean":
            return rng.choice(self.phrases[bool(value)])
        if self.kind == "list":
            text = ", ".join(value[:-1]) + " and " + value[-1] if len(value) > 1 else value[0]
        else:
            text = str(value)
        return rng.choice(self.phrases).format(v=text)


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool: schema parts, a family (look-alike siblings share one), and query templates.

    `templates` mention every required parameter as `{name}`; optional parameters are appended
    as their own phrases when the problem includes them.
    """

    name: str
    family: str
    description: str
    params: tuple[Param, ...]
    templates: tuple[str, ...]

    def schema(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {p.name: p.schema() for p in self.params},
        }

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.params}


def _choice(values: Sequence[Any]) -> Callable[[random.Random], Any]:
    return lambda rng: rng.choice(values)


def _int(lo: int, hi: int) -> Callable[[random.Random], int]:
    return lambda rng: rng.randint(lo, hi)


def _money(rng: random.Random) -> float:
    return round(rng.randint(10, 999) + rng.choice((0.0, 0.25, 0.5, 0.75)), 2)


def _words(n_lo: int, n_hi: int, pool: Sequence[str]) -> Callable[[random.Random], list]:
    return lambda rng: rng.sample(list(pool), rng.randint(n_lo, n_hi))


def _bool(rng: random.Random) -> bool:
    return rng.random() < 0.5


_UNIT = Param(
    "unit",
    "enum",
    'Unit, "celsius" or "fahrenheit".',
    _choice(("celsius", "fahrenheit")),
    (" in {v}", " using {v} degrees"),
    optional=True,
    default="celsius",
)

# A table, one tool per entry: kept in this compact layout rather than one argument per line.
# fmt: off
TOOLS: tuple[Tool, ...] = (
    # weather family
    Tool("get_weather", "weather", "Current weather in a city.",
         (Param("city", "string", "City name.", _choice(_CITIES)), _UNIT),
         ("What is the weather in {city} right now", "Tell me the current weather for {city}",
          "How warm is it in {city} today")),
    Tool("get_weather_forecast", "weather", "Weather forecast for a city.",
         (Param("city", "string", "City name.", _choice(_CITIES)),
          Param("days", "integer", "Days.", _int(2, 14)), _UNIT),
         ("Give me the {days} day forecast for {city}", "What will the weather be in {city} over the next {days} days",
          "Forecast the next {days} days of weather in {city}")),
    Tool("get_air_quality", "weather", "Air quality of a city.",
         (Param("city", "string", "City name.", _choice(_CITIES)),
          Param("include_pollen", "boolean", "Add pollen levels.", _bool,
                {True: (" with pollen levels", " including pollen"),
                 False: (" without pollen levels", " skipping pollen")},
                optional=True, default=False)),
         ("How clean is the air in {city}", "Check the air quality in {city}")),
    # money family
    Tool("convert_currency", "money", "Convert money between currencies.",
         (Param("amount", "number", "Amount to convert.", _money),
          Param("from_currency", "enum", "Source currency.", _choice(_CURRENCIES)),
          Param("to_currency", "enum", "Target currency.", _choice(_CURRENCIES))),
         ("Convert {amount} {from_currency} to {to_currency}",
          "How much is {amount} {from_currency} in {to_currency}")),
    Tool("get_exchange_rate", "money", "Exchange rate of two currencies.",
         (Param("from_currency", "enum", "Source currency.", _choice(_CURRENCIES)),
          Param("to_currency", "enum", "Target currency.", _choice(_CURRENCIES))),
         ("What is the exchange rate from {from_currency} to {to_currency}",
          "Show the {from_currency} to {to_currency} rate")),
    Tool("split_bill", "money", "Split a bill with a tip.",
         (Param("total", "number", "Bill total.", _money),
          Param("people", "integer", "People count.", _int(2, 12)),
          Param("tip_percent", "integer", "Tip in percent.", _int(5, 25),
                (" with a {v} percent tip", " adding {v} percent tip"),
                optional=True, default=15)),
         ("Split a bill of {total} between {people} people", "We owe {total} and there are {people} of us, split it")),
    # time family
    Tool("set_alarm", "time", "Set an alarm.",
         (Param("hour", "integer", "Hour.", _int(0, 23)),
          Param("minute", "integer", "Minute.", _int(0, 59)),
          Param("label", "string", "Alarm label.", _choice(_WORDS),
                (" labeled {v}", " called {v}"), optional=True, default="")),
         ("Set an alarm for {hour} hours {minute} minutes", "Wake me up at hour {hour} minute {minute}")),
    Tool("set_timer", "time", "Start a timer.",
         (Param("minutes", "integer", "Minutes.", _int(1, 90)),
          Param("sound", "boolean", "Ring when done.", _bool,
                {True: (" with a sound", " and ring at the end"), False: (" silently", " with no sound")},
                optional=True, default=True)),
         ("Start a timer for {minutes} minutes", "Count down {minutes} minutes")),
    Tool("create_event", "time", "Create an event.",
         (Param("title", "string", "Event title.", _choice(_WORDS)),
          Param("day", "integer", "Day.", _int(1, 28)),
          Param("attendees", "list", "People invited.", _words(1, 3, _PEOPLE), (" with {v}", " inviting {v}"),
                optional=True, default=[])),
         ("Create an event called {title} on day {day}", "Schedule {title} for day {day} of the month")),
    # messaging family
    Tool("send_email", "message", "Send an email.",
         (Param("to", "string", "Recipient.", _choice(_PEOPLE)),
          Param("subject", "string", "Email subject.", _choice(_WORDS)),
          Param("urgent", "boolean", "Urgent flag.", _bool,
                {True: (" and mark it urgent", " as urgent"), False: (" and mark it not urgent", " as not urgent")},
                optional=True, default=False)),
         ("Email {to} about {subject}", "Send an email to {to} with subject {subject}")),
    Tool("send_sms", "message", "Send a text message.",
         (Param("to", "string", "Recipient.", _choice(_PEOPLE)),
          Param("text", "string", "Message text.", _choice(_WORDS))),
         ("Text {to} the word {text}", "Send an SMS to {to} saying {text}")),
    Tool("send_group_message", "message", "Message several people.",
         (Param("recipients", "list", "Recipients.", _words(2, 3, _PEOPLE)),
          Param("text", "string", "Message text.", _choice(_WORDS))),
         ("Message {recipients} the word {text}", "Send {text} to {recipients}")),
    # media / shopping family
    Tool("create_playlist", "media", "Create a playlist.",
         (Param("name", "string", "Playlist name.", _choice(_WORDS)),
          Param("songs", "list", "Song titles.", _words(2, 3, _WORDS)),
          Param("genre", "enum", "Genre.", _choice(_GENRES),
                (" in the {v} genre", " tagged {v}"), optional=True, default="pop")),
         ("Make a playlist named {name} with {songs}", "Create the playlist {name} containing {songs}")),
    Tool("play_music", "media", "Play music of a genre.",
         (Param("genre", "enum", "Genre.", _choice(_GENRES)),
          Param("volume", "integer", "Volume.", _int(1, 10),
                (" at volume {v}", " with volume {v}"), optional=True, default=5)),
         ("Play some {genre}", "Put on {genre} music")),
    Tool("search_products", "media", "Search products.",
         (Param("query", "string", "Search words.", _choice(_WORDS)),
          Param("max_price", "number", "Highest price.", _money,
                (" under {v}", " cheaper than {v}"), optional=True, default=1000.0),
          Param("in_stock", "boolean", "Only in stock.", _bool,
                {True: (" that are in stock", " only in stock"),
                 False: (" even if out of stock", " including sold out ones")},
                optional=True, default=True)),
         ("Find {query} products", "Search the shop for {query}")),
    Tool("search_recipes", "media", "Search recipes.",
         (Param("dish", "string", "Dish name.", _choice(_DISHES)),
          Param("servings", "integer", "Servings.", _int(1, 8),
                (" for {v} people", " serving {v}"), optional=True, default=2)),
         ("Find a recipe for {dish}", "How do I cook {dish}")),
)
# fmt: on
