"""What nodes and operators name things is printed as written, never read as Rich markup: a volunteer's
GPU summary of "[/]" or a token named "[red]" must neither restyle the console nor crash it."""

from __future__ import annotations

from protocol.accounts import TokenList
from protocol.admin import NodeList
from tests.tui.fixed import FixedClient
from tests.tui.pilot import SIZE
from tui.app import make_app
from tui.screens.node_detail import NodeDetailScreen

ODD = ("[/]", "[bold red]loud", "[link=http://evil.example]x[/link]")


class OddNames(FixedClient):
    async def nodes(self) -> NodeList:
        doc = await super().nodes()
        odd = doc.nodes[0].model_copy(
            update={"gpus": ODD[0], "yielding": True, "yield_reason": ODD[1], "alarm": ODD[2]}
        )
        return doc.model_copy(update={"nodes": [odd, *doc.nodes[1:]]})

    async def tokens(self) -> TokenList:
        doc = await super().tokens()
        odd = [t.model_copy(update={"name": ODD[i % 3]}) for i, t in enumerate(doc.tokens)]
        return TokenList(tokens=odd)


async def test_odd_names_print_as_written_on_every_screen() -> None:
    app = make_app(OddNames(), refresh_s=0.2)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(100):
            if app.loads >= 2:
                break
            await pilot.pause(0.05)
        seen = ""
        for key in ("1", "2", "3", "4", "5", "6", "7", "8", "2"):
            await pilot.press(key)
            await pilot.pause(0.1)
            seen += app.export_screenshot()
        await pilot.press("enter")
        for _ in range(100):
            if isinstance(app.screen, NodeDetailScreen):
                break
            await pilot.pause(0.05)
        await pilot.pause(0.1)
        detail = app.export_screenshot()
    # As typed (the SVG writes a space as &#160;): brackets and all, on the tables and in the detail.
    assert "[/]" in seen and "[/]" in detail
    assert "[bold&#160;red]loud" in seen and "[bold&#160;red]loud" in detail
    assert "[link=http://evil.example]x[/link]" in detail
