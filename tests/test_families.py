"""What each family changes in the method (docs/method.md section 13), checked against plain torch hooks."""
import pytest
import torch
import transformers as T

from conftest import get_tiny
from modality_circuits.analyses.alignment import alignment
from modality_circuits.analyses.backpatch import backpatch_logits
from modality_circuits.data.pairs import build_pairs
from modality_circuits.model import family_of


@pytest.mark.parametrize("config, why", [(T.MllamaConfig, "cross-attention"), (T.Florence2Config, "encoder-decoder"),
                                         (T.T5Config, "encoder-decoder"), (T.GPT2Config, "unsupported architecture")])
def test_architectures_the_method_cannot_serve_say_why(config, why):
    with pytest.raises(ValueError, match=f"{why}.*image tokens in its text sequence; supported families: .*qwen3_vl"):
        family_of(config())


def _stream(model, inputs, replace=None):
    """What each decoder layer's successor reads (the final norm's input for the last), via plain pre-hooks.

    replace: {layer: (positions slice, (B, n, d) values)} written into what layer + 1 reads."""
    layers = model.layers(model.hf_model)
    readers = layers[1:] + [model.decoder_stack(model.hf_model).norm]
    seen, handles = [], []
    for i, reader in enumerate(readers):
        def hook(module, args, i=i):
            x = args[0]
            if replace and i in replace:
                where, value = replace[i]
                x = x.clone()
                x[:, where] = value
            seen.append(x.detach().clone())
            return (x, *args[1:])
        handles.append(reader.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model.hf_model(**inputs).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_deepstack_back_patching_writes_the_stream_the_next_layer_reads():
    """Qwen3-VL: cached and written values include the features injected after layers 0 and 1."""
    model = get_tiny("qwen3_vl")
    pairs = build_pairs("arithmetic", "image", model, n=2, seed=0)
    configs = [(1, 0, 1), (2, 0, 1), (2, 1, 1), (1, 0, 2)]
    logits = backpatch_logits(model, pairs, configs)
    d0, d1 = pairs[0].spans["D"]
    for p, pair in enumerate(pairs):
        stream, _ = _stream(model, pair.inputs)
        for c, (src, dst, w) in enumerate(configs):
            writes = {dst + i: (slice(d0, d1), stream[src + i][:, d0:d1]) for i in range(w)}
            _, by_hooks = _stream(model, pair.inputs, writes)
            torch.testing.assert_close(logits[c, p], by_hooks[0], atol=1e-5, rtol=1e-4)


def test_deepstack_alignment_reads_the_stream_after_the_injection():
    model = get_tiny("qwen3_vl")
    image = build_pairs("color_ordering", "image", model, n=2, seed=2)
    text = build_pairs("color_ordering", "text", model, n=2, seed=2)
    res = alignment(model, image, text, resamples=10)
    by_hand = []
    for ip, tp in zip(image, text):
        (i0, i1), (t0, t1) = ip.spans["D"], tp.spans["D"]
        img, _ = _stream(model, ip.inputs)
        txt, _ = _stream(model, tp.inputs)
        sims = [torch.nn.functional.normalize(a[0, i0:i1], dim=-1) @ torch.nn.functional.normalize(b[0, t0:t1], dim=-1).T
                for a, b in zip(img, txt)]
        by_hand.append(torch.stack([s.max(-1).values.mean() for s in sims]))
    torch.testing.assert_close(res.per_prompt, torch.stack(by_hand), atol=1e-5, rtol=1e-4)
