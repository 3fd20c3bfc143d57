"""What owning, renting and buying tokens cost: the planner's default prices and the arithmetic on them.

Card prices and power draw come from `hardware.catalog` (street price, TDP). The rest are defaults here,
each with where it comes from. All are rough public list prices in US dollars, read in January 2025; they
are not quotes and move monthly, so every one can be overridden (`hearth plan --price-...`).

- Electricity: $0.17 per kWh, about the US residential average for 2024 (US EIA, Electric Power Monthly,
  table 5.6.A, "average price of electricity to ultimate customers", residential). European clubs pay more
  (Eurostat's household average for 2024 H1 is about €0.29).
- Renting: per GPU-hour on-demand prices as listed on public cloud price pages: community GPU clouds
  (RunPod, vast.ai) for the GeForce and workstation cards, Lambda and RunPod for A100/H100/H200, Google
  Cloud for L4. Cards nobody rents by the hour have no default (the comparison then says so).
- An API: $0.88 per million tokens, input and output alike, Together AI's list price for Llama-3.1-70B-
  Instruct-Turbo (the same figure for prompt and completion tokens, so a blended price is exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hardware.catalog import GpuSpec

__all__ = ["CLOUD_USD_PER_GPU_HOUR", "Cost", "CostOption", "Prices", "cost"]

# On-demand $/GPU-hour, January 2025 list prices (see the module docstring for where each is from).
CLOUD_USD_PER_GPU_HOUR: Mapping[str, float] = {
    "RTX 3090": 0.22,
    "RTX 4090": 0.69,
    "RTX 5090": 0.89,
    "RTX A4000": 0.17,
    "RTX A6000": 0.49,
    "L4": 0.71,
    "L40S": 0.86,
    "A100 40GB": 1.29,
    "A100 80GB": 1.79,
    "H100 SXM": 2.99,
    "H200": 3.99,
}

# A card drawing power while it waits for work still draws some: about a tenth of its TDP for the cards
# in the catalog at idle with a model loaded (nvidia-smi readings people publish sit between 5 and 15 %).
IDLE_SHARE = 0.1
DAYS_PER_MONTH = 365.25 / 12


@dataclass(frozen=True, slots=True)
class Prices:
    """Prices the cost comparison uses; the card overrides are by catalog name."""

    electricity_usd_per_kwh: float = 0.17
    hours_per_day: float = 24.0
    amortisation_years: float = 3.0
    api_usd_per_million_tokens: float = 0.88
    card_usd: Mapping[str, float] = field(default_factory=dict)  # overrides the catalog's street price
    cloud_usd_per_gpu_hour: Mapping[str, float] = field(default_factory=dict)  # overrides the defaults

    def __post_init__(self) -> None:
        for name in ("electricity_usd_per_kwh", "api_usd_per_million_tokens"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name.replace('_', ' ')} cannot be negative")
        if not 0 < self.hours_per_day <= 24:
            raise ValueError(f"hours of use per day must be between 0 and 24, not {self.hours_per_day:g}")
        if not self.amortisation_years > 0:
            raise ValueError(f"amortisation years must be positive, not {self.amortisation_years:g}")
        for kind, table in (("card price", self.card_usd), ("cloud price", self.cloud_usd_per_gpu_hour)):
            for name, value in table.items():
                if not value >= 0:
                    raise ValueError(f"{kind} for {name} cannot be negative ({value:g})")

    def card(self, gpu: GpuSpec) -> float:
        return float(self.card_usd.get(gpu.name, gpu.price_usd))

    def cloud(self, gpu: GpuSpec) -> float | None:
        return self.cloud_usd_per_gpu_hour.get(gpu.name, CLOUD_USD_PER_GPU_HOUR.get(gpu.name))


@dataclass(frozen=True, slots=True)
class CostOption:
    name: str  # own / rent / api
    usd_per_month: float | None  # None: no price known (a card nobody rents)
    usd_per_million_tokens: float | None
    note: str


@dataclass(frozen=True, slots=True)
class Cost:
    tokens_per_month: float
    utilisation: float
    options: tuple[CostOption, ...]


def cost(cards: tuple[GpuSpec, ...], tokens_per_month: float, utilisation: float, prices: Prices) -> Cost:
    """Owning `cards` vs renting them for the hours of use vs an API, for `tokens_per_month` tokens.

    Owning: the cards' price spread over the amortisation years, plus the electricity the cards draw in
    the hours of use at `utilisation` (a share of the busy time, 0..1); the host computer, its power and
    the volunteers' time are left out. Renting: the same cards for the same hours.
    """
    util = min(1.0, max(0.0, utilisation))
    hours = prices.hours_per_day * DAYS_PER_MONTH
    per_million = 1e6 / tokens_per_month if tokens_per_month > 0 else None

    def per_m(monthly: float | None) -> float | None:
        return None if monthly is None or per_million is None else monthly * per_million

    capex = sum(prices.card(g) for g in cards)
    watts = sum(g.tdp_w * (IDLE_SHARE + (1 - IDLE_SHARE) * util) for g in cards)
    power = watts / 1000 * hours * prices.electricity_usd_per_kwh
    own = capex / (prices.amortisation_years * 12) + power
    rates = [prices.cloud(g) for g in cards]
    rent = None if any(r is None for r in rates) else sum(r for r in rates if r is not None) * hours
    missing = sorted({g.name for g, r in zip(cards, rates, strict=True) if r is None})
    api = tokens_per_month / 1e6 * prices.api_usd_per_million_tokens
    return Cost(
        tokens_per_month=tokens_per_month,
        utilisation=util,
        options=(
            CostOption(
                "own", own, per_m(own),
                f"${capex:,.0f} of cards over {prices.amortisation_years:g} years + {watts:,.0f} W "
                f"at ${prices.electricity_usd_per_kwh:g}/kWh",
            ),
            CostOption(
                "rent", rent, per_m(rent),
                f"no rental price for {', '.join(missing)}" if missing
                else f"{len(cards)} GPUs for {prices.hours_per_day:g} h a day",
            ),
            CostOption("api", api, per_m(api), f"${prices.api_usd_per_million_tokens:g} per million tokens"),
        ),
    )  # fmt: skip
