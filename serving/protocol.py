"""SGLang's ``/generate`` body <-> the batched sampler's ``TokenRequest``; the reply in SGLang's shape.

Accepted: ``input_ids`` (one prompt), ``image_data: [{"image_grid_thw": [[1, h, w], ...]}]`` (sources, target,
then the preview in text-to-image), ``sampling_params`` with ``max_new_tokens`` = the generated tokens + 1,
``ignore_eos: true``, ``sampling_seed``, temperature / top_p / top_k, and an optional ``logit_bias`` that may
only mask the reserved ids (>= the codebook): the service always samples from the codebook alone.
Editing works (the source ids are in ``input_ids``), which SGLang's own GLM-Image client does not offer.
"""
from __future__ import annotations

import math

from ..core.stages.ar_batch import PromptIds, TokenRequest, check_request, written_grids
from ..core.stages.settings import ARSampling

DISABLED_TOP_K = 16512  # the vision vocabulary: the pack's sampler keeps every codebook id


class BadRequest(ValueError):
    """The request cannot run; the message says what to change (HTTP 400)."""


def _number(params: dict, key: str, default, kind):
    value = params.get(key, default)
    # JSON's Infinity and NaN parse as floats; int() of them raises OverflowError / ValueError
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and (not math.isfinite(value) or value != int(value))):
        raise BadRequest(f"sampling_params.{key} must be a{'n integer' if kind is int else ' number'} (got {value!r}).")
    return kind(value)


def _bad_frames(t) -> bool:
    raise ValueError(f"image_grid_thw frame count {t!r} is not 1")


def _masks_reserved(key, bias, codebook_size: int) -> bool:
    """A ``logit_bias`` entry that masks a reserved vision id (``>= codebook_size``) with a large negative bias."""
    try:
        return int(key) >= codebook_size and float(bias) <= -1e4
    except (TypeError, ValueError):  # "abc", None, "²" (isdigit, but not int)
        return False


def _top_k(params: dict) -> int:
    top_k = _number(params, "top_k", -1, int)
    return DISABLED_TOP_K if top_k == -1 else top_k  # SGLang: -1 disables top-k


def parse_generate(body, ids: PromptIds, max_positions: int) -> TokenRequest:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with input_ids, image_data and sampling_params.")
    if "text" in body and "input_ids" not in body:
        raise BadRequest("send input_ids (the GLM-Image processor's prompt ids), not text.")
    input_ids = body.get("input_ids")
    if not isinstance(input_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
        raise BadRequest("input_ids must be one list of integer token ids (batches: send one request per image).")
    image_data = body.get("image_data")
    try:
        grids = image_data[0]["image_grid_thw"] if isinstance(image_data, list) else image_data["image_grid_thw"]
        grids = tuple((int(h), int(w)) for t, h, w in grids if int(t) == 1 or _bad_frames(t))
    except (KeyError, IndexError, TypeError, ValueError):
        raise BadRequest('image_data must be [{"image_grid_thw": [[1, h, w], ...]}] (the target grid, then the '
                         'preview grid; source grids first when editing).') from None
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise BadRequest("sampling_params must be a JSON object.")
    if params.get("ignore_eos") is not True:
        raise BadRequest("sampling_params.ignore_eos must be true: the grid has a fixed number of tokens.")
    bias = params.get("logit_bias") or {}
    if not isinstance(bias, dict) or not all(_masks_reserved(k, v, ids.codebook_size) for k, v in bias.items()):
        raise BadRequest(f"logit_bias may only mask ids >= {ids.codebook_size} (the reserved vision ids) with a large "
                         f"negative bias; the service never samples them anyway.")
    try:
        sampling = ARSampling(seed=_number(params, "sampling_seed", 0, int),
                                  temperature=_number(params, "temperature", 1.0, float),
                                  top_p=_number(params, "top_p", 1.0, float), top_k=_top_k(params))
        request = TokenRequest(tuple(input_ids), grids, sampling)
        check_request(request, ids, max_positions)
    except BadRequest:
        raise
    except ValueError as e:
        raise BadRequest(str(e)) from None
    need = sum(h * w for h, w in written_grids(request, ids)) + 1
    if params.get("max_new_tokens") != need:
        raise BadRequest(f"sampling_params.max_new_tokens must be {need} (the grids' tokens + 1 end marker), got "
                         f"{params.get('max_new_tokens')!r}.")
    return request


def generate_reply(request_id: str, request: TokenRequest, ids: list[int], end_id: int, batch_size: int) -> dict:
    """SGLang's reply: the ids then the end marker; ``meta_info.batch_size``: the rows decoded together."""
    return {"text": "", "output_ids": list(ids) + [end_id],
            "meta_info": {"id": request_id, "prompt_tokens": len(request.input_ids),
                          "completion_tokens": len(ids) + 1, "finish_reason": {"type": "length",
                                                                              "length": len(ids) + 1},
                          "batch_size": batch_size}}
