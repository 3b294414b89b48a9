"""Regenerate locales/en/ from the node definitions and list what the other languages miss or name wrongly.

    python locales/sync.py

English is exactly the definitions' text (display names, descriptions, tooltips, categories); translate the
entries the report lists into the other languages' nodeDefs.json and main.json by hand.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from standalone import register_pack  # noqa: E402


def main() -> int:
    register_pack()
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from glm_image_nodes.testing import locales

    locales.write_english(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    print(f"wrote {os.path.join(locales.LOCALES, 'en')}")
    problems = [p for lang in locales.LANGUAGES[1:]
                for p in locales.locale_problems(lang, *locales.read_locale(lang), NODE_CLASS_MAPPINGS)]
    print("\n".join(problems) or "every language covers every node, input and output")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
