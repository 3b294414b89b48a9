"""The zh and en locales (ComfyUI frontend format) cover every node, input and output of NODE_CLASS_MAPPINGS, and
name nothing that does not exist; English is exactly the node definitions' text (``python locales/sync.py``)."""
import re

import pytest
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from glm_image_nodes.testing import locales

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.mark.parametrize("lang", locales.LANGUAGES)
def test_locale_covers_every_node_input_and_output(lang):
    problems = locales.locale_problems(lang, *locales.read_locale(lang), NODE_CLASS_MAPPINGS)
    assert not problems, "\n".join(problems) + "\n(run python locales/sync.py for English, translate the rest)"


def test_english_is_the_node_definitions():
    node_defs, main = locales.read_locale("en")
    assert node_defs == locales.english_node_defs(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS), \
        "locales/en is stale: run python locales/sync.py"
    assert main == locales.english_main(NODE_CLASS_MAPPINGS)


def test_chinese_is_translated():
    node_defs, main = locales.read_locale("zh")
    untranslated = [where for where, text in locales.texts(node_defs) if not CJK.search(text)]
    assert not untranslated, untranslated
    assert main["nodeCategories"]["loaders"] == "加载器"  # the frontend's own word for core's loaders


def test_problems_are_found():
    """The checker itself: a missing node, input, tooltip and output, and names that do not exist."""
    node_defs, main = locales.read_locale("zh")
    node_defs = {k: {**v, "inputs": dict(v["inputs"]), "outputs": dict(v["outputs"])} for k, v in node_defs.items()}
    del node_defs["GLMImageVAEEncode"]
    del node_defs["GLMImageARSampler"]["inputs"]["seed"]
    del node_defs["GLMImageARSampler"]["inputs"]["top_k"]["tooltip"]
    del node_defs["GLMImageRerank"]["outputs"]["2"]
    node_defs["GLMImageARSampler"]["inputs"]["steps"] = {"name": "步数"}
    node_defs["GLMImageARSampler"]["outputs"]["2"] = {"name": "多余"}
    node_defs["GLMImageNoSuchNode"] = {"display_name": "无", "description": "无", "inputs": {}, "outputs": {}}
    main = {"nodeCategories": {**main["nodeCategories"], "nowhere": "无处"}}
    del main["nodeCategories"]["vae"]
    problems = locales.locale_problems("zh", node_defs, main, NODE_CLASS_MAPPINGS)
    assert sorted(problems) == sorted([
        "zh: nodeDefs names node 'GLMImageNoSuchNode', which does not exist",
        "zh: node GLMImageVAEEncode has no entry",
        "zh: GLMImageARSampler input 'seed' is missing",
        "zh: GLMImageARSampler input 'top_k' has no tooltip (the node defines one)",
        "zh: GLMImageARSampler names input 'steps', which the node does not have",
        "zh: GLMImageARSampler names output '2', which the node does not have (outputs go by index 0..1)",
        "zh: GLMImageRerank output 2 is missing",
        "zh: main.json nodeCategories has no entry for 'vae'",
        "zh: main.json nodeCategories names 'nowhere', which no node's category uses",
    ]), problems
