"""``usage.status`` and ``usage.cost``: token counts recorded per run, priced from config.

The rows come from the sessions service (one per run, written when the run completes); this
module only adds them up. Prices are looked up as ``"provider/model"`` first, then as
``"model"``; a model without a price counts its tokens but no cost, and is named in
``unpricedModels`` so the operator knows the total is short. The offline provider is free.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from kernel import invalid_request

from .config import ModelPrice

__all__ = ["DAY_MS", "MAX_DAYS", "cost_report", "parse_range", "price_for", "status_windows"]

DAY_MS = 86_400_000
MAX_DAYS = 366
DEFAULT_DAYS = 30
FREE_PROVIDERS = frozenset({"offline"})


def parse_date(value: str, field: str) -> dt.date:
    try:
        if len(value) != 10:
            raise ValueError
        return dt.date.fromisoformat(value)
    except ValueError:
        raise invalid_request(
            f"{field} must be a date as YYYY-MM-DD, got {value!r}", field=field
        ) from None


def parse_range(
    start: str | None, end: str | None, days: int | None, *, today: dt.date
) -> tuple[dt.date, dt.date]:
    """The first and last day (UTC, inclusive) a ``usage.cost`` request asks for."""
    if (start is None) != (end is None):
        missing = "endDate" if end is None else "startDate"
        raise invalid_request("give both startDate and endDate, or neither", field=missing)
    if start is not None and end is not None:
        if days is not None:
            raise invalid_request("give either startDate/endDate or days, not both", field="days")
        first, last = parse_date(start, "startDate"), parse_date(end, "endDate")
        if last < first:
            raise invalid_request("endDate is before startDate", field="endDate")
        if (last - first).days + 1 > MAX_DAYS:
            raise invalid_request(f"the range is longer than {MAX_DAYS} days", field="endDate")
        return first, last
    count = DEFAULT_DAYS if days is None else days
    return today - dt.timedelta(days=count - 1), today


def day_start_ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def price_for(prices: Mapping[str, ModelPrice], provider: str, model: str) -> ModelPrice | None:
    if provider in FREE_PROVIDERS:
        return ModelPrice()
    return prices.get(f"{provider}/{model}") or prices.get(model)


def _cost(price: ModelPrice | None, input_tokens: int, output_tokens: int) -> float:
    if price is None:
        return 0.0
    return (input_tokens * price.input + output_tokens * price.output) / 1_000_000


def _totals() -> dict[str, Any]:
    return {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0, "cost": 0.0, "runs": 0}


def _add(totals: dict[str, Any], row: Mapping[str, Any], cost: float) -> None:
    totals["inputTokens"] += row["inputTokens"]
    totals["outputTokens"] += row["outputTokens"]
    totals["totalTokens"] += row["inputTokens"] + row["outputTokens"]
    totals["cost"] += cost
    totals["runs"] += 1


def cost_report(
    rows: Iterable[Mapping[str, Any]],
    prices: Mapping[str, ModelPrice],
    *,
    first: dt.date,
    last: dt.date,
) -> dict[str, Any]:
    """Daily and total tokens and cost over ``first..last``, and the same per model."""
    daily: dict[str, dict[str, Any]] = {}
    day = first
    while day <= last:
        daily[day.isoformat()] = {"date": day.isoformat(), **_totals()}
        day += dt.timedelta(days=1)
    totals = _totals()
    by_model: dict[tuple[str, str], dict[str, Any]] = {}
    unpriced: set[str] = set()

    for row in rows:
        price = price_for(prices, row["provider"], row["model"])
        if price is None:
            unpriced.add(f"{row['provider']}/{row['model']}")
        cost = _cost(price, row["inputTokens"], row["outputTokens"])
        date = dt.datetime.fromtimestamp(row["ts"] / 1000, dt.UTC).date().isoformat()
        if date in daily:
            _add(daily[date], row, cost)
        _add(totals, row, cost)
        model_key = (row["provider"], row["model"])
        if model_key not in by_model:
            by_model[model_key] = {
                "provider": row["provider"],
                "model": row["model"],
                "priced": price is not None,
                **_totals(),
            }
        _add(by_model[model_key], row, cost)

    for entry in (*daily.values(), totals, *by_model.values()):
        entry["cost"] = round(entry["cost"], 6)
    return {
        "startDate": first.isoformat(),
        "endDate": last.isoformat(),
        "days": len(daily),
        "daily": list(daily.values()),
        "totals": totals,
        "byModel": sorted(by_model.values(), key=lambda e: (-e["totalTokens"], e["model"])),
        "unpricedModels": sorted(unpriced),
    }


def status_windows(
    rows: Iterable[Mapping[str, Any]], *, now_ms: int, windows: Mapping[str, int]
) -> dict[str, dict[str, dict[str, int]]]:
    """Per provider, the tokens and runs of each window (label -> length in ms)."""
    result: dict[str, dict[str, dict[str, int]]] = {}
    for row in rows:
        per_window = result.setdefault(row["provider"], {})
        for label, length in windows.items():
            counts = per_window.setdefault(label, {"inputTokens": 0, "outputTokens": 0, "runs": 0})
            if row["ts"] >= now_ms - length:
                counts["inputTokens"] += row["inputTokens"]
                counts["outputTokens"] += row["outputTokens"]
                counts["runs"] += 1
    return result
