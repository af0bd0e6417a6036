"""The HTML page ``dvc plots show`` fills (.dvc/config ``plots.html_template``): it carries Vega, Vega-Lite
and vega-embed itself, bundled by vl-convert, so the charts draw without network access.

    python -m anomaly_pipeline.plots_page      # rewrite .dvc/plots_page.html (after upgrading vl-convert-python)
"""

from __future__ import annotations

from pathlib import Path

import vl_convert

PAGE_FILE = Path(".dvc/plots_page.html")
VEGA_LITE_VERSION = "5.21"  # the schema version of DVC's plot templates and ours (.dvc/plots/*.json)
STYLE = "body{font-family:system-ui,sans-serif;margin:16px}table{border-spacing:15px}"


def render() -> str:
    """The page: DVC replaces {plot_divs} (and {refresh_tag} for live plots) with its charts."""
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    versions = (f"vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE_VERSION}, "
                f"vega-embed {vl_convert.get_vega_embed_version()}, bundled by vl-convert-python {vl_convert.__version__}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n{{refresh_tag}}\n<meta charset="utf-8">\n'
            f"<title>DVC plots</title>\n<!-- {versions}; written by python -m anomaly_pipeline.plots_page -->\n"
            f'<script type="text/javascript">{bundle}</script>\n<style>{STYLE}</style>\n</head>\n'
            f"<body>\n{{plot_divs}}\n</body>\n</html>\n")


if __name__ == "__main__":
    PAGE_FILE.write_text(render())
    print(f"wrote {PAGE_FILE}")
