"""The README's screenshots: the app on the demo fleet, exported as SVG.

Kept out of ``tui/demo.py`` so the fleet the tests use does not carry a
program that drives the whole app.
"""

from __future__ import annotations

from pathlib import Path

from tui.demo import demo_fleet


async def _screenshots(out: Path, size: tuple[int, int]) -> list[Path]:
    from tui.app import PortalbdApp
    from tui.config import Settings

    written = []
    for name, keys in (("overview", ["down"]), ("instance", ["down", "enter"])):
        app = PortalbdApp(
            Settings(discover=False, theme="textual-dark"), fleet=demo_fleet(), live=False
        )
        async with app.run_test(size=size) as pilot:
            await pilot.press(*keys)
            await pilot.pause()
            path = out / f"tui-{name}.svg"
            path.write_text(app.export_screenshot(title=f"portalbd-tui: {name}"))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Write the README's screenshots: `python -m tui.screenshots docs/screenshots`."""
    import argparse
    import asyncio
    import os
    import time

    parser = argparse.ArgumentParser(prog="python -m tui.screenshots", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="120x40", help="WIDTHxHEIGHT (120x40)")
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.size.split("x"))
    os.environ["TZ"] = "UTC"  # the same pictures wherever they are made
    time.tzset()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(_screenshots(args.out, (width, height))):
        print(path)


if __name__ == "__main__":
    main()
