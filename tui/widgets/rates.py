"""One outcome per minute over the last half hour: a label, a sparkline (one cell a
minute, the newest on the right, scaled from zero so a quiet minute looks quiet) and
the numbers (this minute, the busiest minute, the sum)."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top <= 0:
        return "▁" * len(values)
    # Any non-zero minute shows at least one step: one reject in an hour matters.
    return "".join(BARS[max(1, round(v / top * (len(BARS) - 1)))] if v > 0 else "▁" for v in values)


class RateLine(Widget):
    DEFAULT_CSS = """
    RateLine {
        height: 1;
    }
    RateLine.-accepted { color: $success; }
    RateLine.-rejected { color: $error; }
    RateLine.-deferred { color: $warning; }
    """

    values: reactive[list[int]] = reactive(list, always_update=True)

    def __init__(self, outcome: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.outcome = outcome
        self.add_class(f"-{outcome}")

    def render(self) -> Text:
        text = Text(f"{self.outcome:<10}", style="bold")
        if not self.values:
            text.append("no figures while the engine is not running", style="not bold dim")
            return text
        data = [int(v) for v in self.values]
        text.append(sparkline(data))
        text.append(f"  now {data[-1]:>3}  max {max(data):>3}  Σ {sum(data):>5}", style="not bold")
        return text
