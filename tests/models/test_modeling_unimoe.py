import math
import re

import pytest
import torch

from modeling_unimoe import UniMoEForCausalLM, router_balance_loss, router_z_loss
from modeling_unimoe.transformers_compat import ACTIVATION_CHECKPOINTING_ENABLE, ACTIVATION_CHECKPOINTING_KWARGS, CACHE_NAME
from tests.utils.models import make_tiny_model, random_ids


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_forward_shapes_and_router_logits(tiny_model):
    ids = random_ids(2, 7)
    out = tiny_model(ids, output_router_logits=True)
    text = tiny_model.config.text_config
    assert out.logits.shape == (2, 7, text.vocab_size)
    assert len(out.router_logits) == len(text.sparse_layer_indices)
    assert all(logits.shape == (14, text.num_experts) for logits in out.router_logits)
    assert tiny_model(ids).router_logits is None
    tiny_model.set_attn_implementation("eager")  # sdpa computes no attention weights to return
    recorded = tiny_model(ids, output_hidden_states=True, output_attentions=True)
    assert len(recorded.hidden_states) == text.num_hidden_layers + 1
    assert len(recorded.attentions) == text.num_hidden_layers
    assert recorded.attentions[0].shape == (2, text.num_attention_heads, 7, 7)


def test_output_router_logits_from_config():
    model = make_tiny_model(output_router_logits=True)
    ids = random_ids(1, 5)
    out = model(ids, labels=ids)
    assert out.router_logits is not None and out.aux_loss is not None


@pytest.mark.parametrize("router_type", ["topk_softmax", "softmax_topk"])
def test_eager_and_grouped_mm_experts_agree(router_type):
    model = make_tiny_model(router_type=router_type, num_shared_experts=1).train()
    ids = random_ids(3, 11)
    results = {}
    for implementation in ("eager", "grouped_mm"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), _grads(model))
    (eager_logits, eager_grads), (grouped_logits, grouped_grads) = results["eager"], results["grouped_mm"]
    torch.testing.assert_close(grouped_logits, eager_logits, atol=1e-5, rtol=0)
    assert eager_grads.keys() == grouped_grads.keys()
    assert any(".experts.gate_up_proj" in name for name in eager_grads)
    for name in eager_grads:
        torch.testing.assert_close(grouped_grads[name], eager_grads[name], atol=1e-5, rtol=0, msg=name)


def test_grouped_mm_is_really_used(monkeypatch):
    from transformers.integrations import moe

    calls = []
    original = moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    monkeypatch.setitem(moe.ALL_EXPERTS_FUNCTIONS._global_mapping, "grouped_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = make_tiny_model()
    model.set_experts_implementation("grouped_mm")
    model(random_ids(1, 4))
    assert len(calls) == len(model.config.text_config.sparse_layer_indices)


def test_sdpa_and_eager_attention_agree():
    ids = random_ids(2, 9)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    model = make_tiny_model()
    sdpa = model(ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(sdpa[1], eager[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa[0, 3:], eager[0, 3:], atol=1e-5, rtol=0)


def test_greedy_generate_with_cache_equals_without(tiny_model):
    prompt = random_ids(1, 6)
    cached = tiny_model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True)
    uncached = tiny_model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=False)
    # and against a hand-written loop re-running the full sequence at every step
    sequence = prompt
    with torch.no_grad():
        for _ in range(20):
            next_token = tiny_model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert cached.shape[1] == prompt.shape[1] + 20
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, sequence)


def test_left_padded_batch_matches_single_prompts(tiny_model):
    pad = tiny_model.config.text_config.pad_token_id
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((3, width), pad)
    attention_mask = torch.zeros((3, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=pad)
    batch = tiny_model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = tiny_model.generate(prompt[None], **kwargs)
        assert torch.equal(batch[row, width:], alone[0, len(prompt) :]), f"prompt {row} differs in a batch"


def enable_activation_checkpointing(model, **checkpoint_kwargs):
    """`model.activation_checkpointing_enable(activation_checkpointing_kwargs=...)`, by the running release's names."""
    getattr(model, ACTIVATION_CHECKPOINTING_ENABLE)(**{ACTIVATION_CHECKPOINTING_KWARGS: checkpoint_kwargs})


def test_gradient_checkpointing_gives_same_gradients():
    ids = random_ids(2, 8)
    reference = make_tiny_model().train()
    reference(ids, labels=ids, output_router_logits=True).loss.backward()
    checkpointed = make_tiny_model().train()
    enable_activation_checkpointing(checkpointed, use_reentrant=False)
    checkpointed(ids, labels=ids, output_router_logits=True).loss.backward()
    expected = _grads(reference)
    got = _grads(checkpointed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_router_losses_keep_their_gradient_under_activation_checkpointing(use_reentrant):
    """Re-entrant checkpointing (what many peft recipes set) runs the first forward without autograd: router logits
    recorded there would carry no gradient, and the balance and z-losses would silently stop training the routers."""
    ids = random_ids(2, 8)
    reference = make_tiny_model(router_z_loss_coef=0.01).train()
    expected = reference(ids, labels=ids, output_router_logits=True)
    expected.loss.backward()
    checkpointed = make_tiny_model(router_z_loss_coef=0.01).train()
    enable_activation_checkpointing(checkpointed, use_reentrant=use_reentrant)
    got = checkpointed(ids, labels=ids, output_router_logits=True)
    assert got.aux_loss.requires_grad and got.z_loss.requires_grad
    torch.testing.assert_close(got.aux_loss, expected.aux_loss)
    got.loss.backward()
    routers = [name for name, _ in reference.named_parameters() if name.endswith("mlp.gate.weight")]
    assert routers
    for name in routers:
        torch.testing.assert_close(
            checkpointed.get_parameter(name).grad, reference.get_parameter(name).grad, atol=1e-6, rtol=1e-5, msg=name
        )


def test_activation_checkpointing_never_fills_a_given_cache():
    """The checkpointing wrapper drops the cache by the name its transformers release uses; the decoder layers get it
    under that name, so the backward's recomputation cannot append the same keys a second time."""
    from transformers.cache_utils import DynamicCache

    model = make_tiny_model().train()
    enable_activation_checkpointing(model, use_reentrant=False)
    cache = DynamicCache(config=model.config.text_config)
    ids = random_ids(1, 6)
    model(ids, labels=ids, use_cache=True, **{CACHE_NAME: cache}).loss.backward()
    assert cache.get_seq_length() == 0


def test_shared_experts_are_always_added():
    model = make_tiny_model(num_shared_experts=2)
    block = model.model.language_model.layers[0].mlp
    assert block.shared_experts.gate_proj.out_features == 2 * model.config.text_config.moe_intermediate_size
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size)
    with torch.no_grad():
        full, _ = block(hidden)
        block.shared_experts.down_proj.weight.zero_()
        routed_only, _ = block(hidden)
    assert not torch.allclose(full, routed_only)



@pytest.mark.parametrize(
    "gated, bias, output_size", [(True, False, 6), (False, True, 6), (False, True, 9)],
    ids=["swiglu", "mlp-with-biases", "mlp-with-a-wider-output"],
)
def test_the_eager_experts_kernel_against_a_per_row_loop_and_numerical_gradients(gated, bias, output_size):
    """`UniMoEGroupedExpertsFunction` (the eager experts, with its hand-written backward) for every layout
    `UniMoEExperts` holds: the language model's SwiGLU experts without biases, CuMo's CLIP MLPs (biases, no gate) and
    CuMo's projector (biases, output wider than the input); expert 1 gets no row."""
    from transformers.activations import ACT2FN

    from modeling_unimoe.modeling_unimoe import UniMoEGroupedExpertsFunction

    generator = torch.Generator().manual_seed(0)
    hidden, intermediate, counts = 6, 5, [3, 0, 4]

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    up_rows = 2 * intermediate if gated else intermediate
    inputs = (
        tensor(sum(counts), hidden), tensor(sum(counts)), tensor(3, up_rows, hidden), tensor(3, up_rows) if bias else None,
        tensor(3, output_size, intermediate), tensor(3, output_size) if bias else None,
    )  # fmt: skip
    act_fn = ACT2FN["gelu"]

    def kernel(*tensors):
        return UniMoEGroupedExpertsFunction.apply(*tensors, counts, act_fn, gated)

    states, weights, up_proj, up_bias, down_proj, down_bias = inputs
    experts = [0] * counts[0] + [2] * counts[2]
    expected = []
    for row, expert in enumerate(experts):
        projected = up_proj[expert] @ states[row] + (up_bias[expert] if bias else 0)
        activated = act_fn(projected[:intermediate]) * projected[intermediate:] if gated else act_fn(projected)
        expected.append(weights[row] * (down_proj[expert] @ activated + (down_bias[expert] if bias else 0)))
    torch.testing.assert_close(kernel(*inputs), torch.stack(expected))
    assert torch.autograd.gradcheck(kernel, inputs)

@pytest.mark.parametrize(
    "gated, bias, output_size, activation",
    [(True, False, 6, "silu"), (False, True, 6, "gelu"), (False, True, 9, "gelu"), (False, False, 6, "linear")],
    ids=["swiglu", "mlp-with-biases", "mlp-with-a-wider-output", "identity-activation"],
)
def test_the_float32_experts_kernel_matches_float64_in_value_and_gradients(gated, bias, output_size, activation, monkeypatch):
    """In float32 on CPU the kernel's products run in oneDNN (`_expert_linear`, here for weights of any size):
    outputs and every gradient equal a per-row float64 computation's to fp32 rounding. With an identity activation the
    activated rows are the saved pre-activations themselves, so weighting them in place would corrupt the backward."""
    from transformers.activations import ACT2FN

    from modeling_unimoe import modeling_unimoe
    from modeling_unimoe.modeling_unimoe import UniMoEGroupedExpertsFunction

    monkeypatch.setattr(modeling_unimoe, "_ONEDNN_MIN_WEIGHT", 0)

    generator = torch.Generator().manual_seed(1)
    hidden, intermediate, counts = 16, 24, [5, 0, 1, 9]
    up_rows = 2 * intermediate if gated else intermediate
    shapes = [
        (sum(counts), hidden), (sum(counts),), (4, up_rows, hidden), (4, up_rows) if bias else None,
        (4, output_size, intermediate), (4, output_size) if bias else None,
    ]  # fmt: skip
    reference = [None if shape is None else torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]
    upstream = torch.randn(sum(counts), output_size, generator=generator, dtype=torch.float64)

    act_fn = ACT2FN[activation]

    def per_row(states, weights, up_proj, up_bias, down_proj, down_bias):  # plain autograd, one row at a time
        experts = [expert for expert, count in enumerate(counts) for _ in range(count)]
        rows = []
        for row, expert in enumerate(experts):
            projected = up_proj[expert] @ states[row] + (up_bias[expert] if bias else 0)
            activated = act_fn(projected[:intermediate]) * projected[intermediate:] if gated else act_fn(projected)
            rows.append(weights[row] * (down_proj[expert] @ activated + (down_bias[expert] if bias else 0)))
        return torch.stack(rows)

    def run(function, dtype):
        tensors = [None if t is None else t.to(dtype).requires_grad_() for t in reference]
        output = function(*tensors)
        output.backward(upstream.to(dtype))
        return output, [t.grad for t in tensors if t is not None]

    kernel = lambda *tensors: UniMoEGroupedExpertsFunction.apply(*tensors, counts, act_fn, gated)  # noqa: E731
    (output, grads), (expected, expected_grads) = run(kernel, torch.float32), run(per_row, torch.float64)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_float32_expert_products_run_in_onednn_on_cpu(monkeypatch):
    """The eager experts' float32 CPU products go to oneDNN's inner product (forward and the input gradient), not
    `aten::mm`, once the weights reach `_ONEDNN_MIN_WEIGHT` elements; float64 and smaller weights do not."""
    from modeling_unimoe import modeling_unimoe
    from modeling_unimoe.modeling_unimoe import UniMoEGroupedExpertsFunction

    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].dtype)
            return onednn(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())

    def run(dtype):
        states = torch.randn(3, 8, dtype=dtype, requires_grad=True)
        up_proj, down_proj = torch.randn(2, 10, 8, dtype=dtype), torch.randn(2, 8, 5, dtype=dtype)
        output = UniMoEGroupedExpertsFunction.apply(
            states, torch.ones(3, dtype=dtype), up_proj, None, down_proj, None, [2, 1], torch.nn.functional.silu, True
        )
        output.sum().backward()

    run(torch.float32)  # 80- and 40-element weights: below the threshold
    assert calls == []
    monkeypatch.setattr(modeling_unimoe, "_ONEDNN_MIN_WEIGHT", 40)
    run(torch.float64)
    with torch.backends.mkldnn.flags(enabled=False):
        run(torch.float32)
    assert calls == []
    run(torch.float32)
    assert calls == [torch.float32] * 8  # 2 experts x (up, down forward; down, up input gradient)


def test_the_onednn_product_takes_any_bias_layout_and_compiles(monkeypatch):
    """`_expert_linear` equals `F.linear` for a bias that is a strided view (oneDNN reads biases as contiguous), and
    under `torch.compile` (inductor lowers oneDNN's op only in frozen graphs: it takes `F.linear` there), as CuMo's
    projector experts, which run this kernel whatever `experts_implementation` says, do when a model is compiled."""
    from modeling_unimoe import modeling_unimoe
    from modeling_unimoe.modeling_unimoe import _expert_linear

    monkeypatch.setattr(modeling_unimoe, "_ONEDNN_MIN_WEIGHT", 0)
    generator = torch.Generator().manual_seed(0)
    inputs, weight = torch.randn(5, 8, generator=generator), torch.randn(6, 8, generator=generator)
    strided_bias = torch.randn(6, 2, generator=generator)[:, 0]  # stride 2
    expected = torch.nn.functional.linear(inputs, weight, strided_bias)
    torch.testing.assert_close(_expert_linear(inputs, weight, strided_bias), expected)
    torch._dynamo.reset()
    compiled = torch.compile(_expert_linear, fullgraph=True)
    torch.testing.assert_close(compiled(inputs, weight, strided_bias), expected)


def test_loss_parts():
    model = make_tiny_model(router_aux_loss_coef=0.3, router_z_loss_coef=0.05)
    ids = random_ids(2, 6)
    plain = model(ids, labels=ids)
    assert plain.aux_loss is None and plain.z_loss is None
    torch.testing.assert_close(plain.loss, plain.ce_loss)
    with_router = model(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(with_router.ce_loss, plain.ce_loss)
    expected = with_router.ce_loss + 0.3 * with_router.aux_loss + 0.05 * with_router.z_loss
    torch.testing.assert_close(with_router.loss, expected)


# ---- router losses -------------------------------------------------------------------------------------------------


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_balance_loss_hand_computed():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.2, 3.0], [1.0, 0.9, -2.0]]
    top_k, num_experts = 2, 3
    # by hand: every token's two largest logits count as assignments
    selected = [sorted(range(3), key=lambda e: -row[e])[:top_k] for row in logits]
    fraction = [sum(e in chosen for chosen in selected) / (len(logits) * top_k) for e in range(num_experts)]
    mean_prob = [sum(_softmax(row)[e] for row in logits) / len(logits) for e in range(num_experts)]
    expected = num_experts * sum(f * p for f, p in zip(fraction, mean_prob))
    got = router_balance_loss((torch.tensor(logits),), top_k)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # two layers: the mean of the per-layer losses
    flipped = torch.tensor(logits).flip(-1)
    two_layers = router_balance_loss((torch.tensor(logits), flipped), top_k)
    assert two_layers.item() == pytest.approx((expected + router_balance_loss((flipped,), top_k).item()) / 2, abs=1e-6)


def test_balance_loss_is_minimal_for_uniform_routing():
    # 4 experts, top-1, each expert chosen by exactly one token with equal mean probability
    balanced = torch.eye(4) * 3.0
    assert router_balance_loss((balanced,), 1).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 4)
    assert router_balance_loss((collapsed,), 1).item() > 1.5
    # Identical tokens with router distribution p: the loss is E * max(p) (top-1), >= 1, equal only for uniform p.
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        row = torch.randn(4, generator=generator)
        loss = router_balance_loss((row.repeat(8, 1),), 1).item()
        assert loss == pytest.approx(4 * torch.softmax(row, -1).max().item(), abs=1e-6)
        assert loss > 1.0
    assert router_balance_loss((torch.zeros(8, 4),), 1).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_and_z_loss_ignore_padding():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 5, 4, generator=generator)  # batch 2, seq 5
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    garbage = logits.clone()
    garbage[0] = torch.tensor([50.0, -50.0, 0.0, 0.0])
    garbage[1] = torch.tensor([40.0, 30.0, -9.0, 0.0])
    kept = logits[mask.reshape(-1).bool()]
    for loss_fn in (lambda l, m: router_balance_loss((l,), 2, m), lambda l, m: router_z_loss((l,), m)):
        reference = loss_fn(kept, None)
        torch.testing.assert_close(loss_fn(logits, mask), reference)
        torch.testing.assert_close(loss_fn(garbage, mask), reference)
    assert not torch.isclose(router_balance_loss((garbage,), 2), router_balance_loss((logits,), 2))


def test_z_loss_hand_computed():
    logits = [[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]]
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 3
    assert router_z_loss((torch.tensor(logits),)).item() == pytest.approx(expected, abs=1e-5)


def test_model_balance_loss_uses_attention_mask():
    model = make_tiny_model()
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    other_ids = ids.clone()
    other_ids[0, :2] = 7  # padding content must not matter
    a = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    b = model(other_ids, attention_mask=mask, labels=ids, output_router_logits=True)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    torch.testing.assert_close(a.z_loss, b.z_loss)


def test_router_terms_follow_trainer_token_normalisation():
    """With `num_items_in_batch` (Trainer under gradient accumulation / several processes) the CE is a share of the
    whole optimizer step; the router terms must be weighted the same way or they grow with the accumulation."""
    model = make_tiny_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    ids = random_ids(2, 6)
    local_items = (ids[:, 1:] != -100).sum()
    plain = model(ids, labels=ids, output_router_logits=True)
    accumulated = model(ids, labels=ids, output_router_logits=True, num_items_in_batch=4 * local_items)
    torch.testing.assert_close(accumulated.ce_loss, plain.ce_loss / 4)
    torch.testing.assert_close(accumulated.loss - accumulated.ce_loss, (plain.loss - plain.ce_loss) / 4)


@pytest.mark.parametrize("text_only", [True, False])
@pytest.mark.parametrize("module", ["model", "model.model", "model.model.language_model"])
def test_every_public_forward_returns_a_tuple_on_request(text_only, module):
    """`return_dict=False` gives the output's non-None fields as a tuple, in order, from each public forward."""
    model = make_tiny_model(text_only=text_only)
    target = model.get_submodule(module.removeprefix("model").removeprefix("."))
    ids = random_ids(1, 5)
    with torch.no_grad():
        as_dict = target(ids, use_cache=True)
        as_tuple = target(ids, use_cache=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    torch.testing.assert_close(as_tuple[0], as_dict.to_tuple()[0], atol=0, rtol=0)


BAD_ID_SHAPES = {"empty": torch.zeros(1, 0, dtype=torch.long), "no_rows": torch.zeros(0, 5, dtype=torch.long),
                 "one_dimensional": torch.tensor([5, 6, 7])}


@pytest.mark.parametrize("ids", BAD_ID_SHAPES.values(), ids=BAD_ID_SHAPES.keys())
@pytest.mark.parametrize("module", ["model", "model.model.language_model"])
def test_token_ids_that_are_not_batch_by_sequence_are_named(ids, module):
    """Without the check these failed deep inside attention (`cannot reshape tensor of 0 elements`, a size mismatch)
    or inside `generate` (`IndexError: tuple index out of range`)."""
    model = make_tiny_model()
    target = model.get_submodule(module.removeprefix("model").removeprefix("."))
    shape = rf"`input_ids` must be a 2-D \[batch, sequence\] tensor .* got shape {re.escape(str(tuple(ids.shape)))}"
    with pytest.raises(ValueError, match=shape):
        target(ids)
    if module == "model":
        with pytest.raises(ValueError, match=shape):
            model.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("shape", [(1, 0, 64), (3, 64)])
def test_embeddings_that_are_not_batch_by_sequence_by_hidden_are_named(shape):
    with pytest.raises(ValueError, match=r"`inputs_embeds` must be a 3-D \[batch, sequence, hidden\] tensor"):
        make_tiny_model()(inputs_embeds=torch.zeros(shape))


@pytest.mark.parametrize("bad_id", [512, 10_000, -1, -100])
@pytest.mark.parametrize("module", ["model", "model.model.language_model"])
def test_ids_outside_the_vocabulary_are_named(bad_id, module):
    """Checked at prefill (on CUDA the embedding would hit a device-side assert); a cached single-token step is not
    checked up front (no host sync per decoding step), but its CPU `IndexError` is turned into the same message."""
    model = make_tiny_model()
    target = model.get_submodule(module.removeprefix("model").removeprefix("."))
    outside = r"`input_ids` hold 1 ids outside the vocabulary \[0, 512\)"
    with pytest.raises(ValueError, match=outside):
        target(torch.tensor([[7, bad_id, 9]]))
    cache = getattr(target(torch.tensor([[7, 8]]), use_cache=True), CACHE_NAME)
    with pytest.raises(ValueError, match=outside):
        target(torch.tensor([[bad_id]]), **{CACHE_NAME: cache})


def test_the_text_only_class_refuses_media_inputs_by_name():
    """`UniMoETextForCausalLM` has no towers: media inputs are an error naming them, in `forward` and `generate`
    (`forward` would otherwise pass them on in its keyword arguments, unused)."""
    from tests.utils.models import make_tiny_text_model

    model, ids = make_tiny_text_model(), torch.tensor([[1, 5, 9]])
    for call in (model, lambda *a, **k: model.generate(*a, **k, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"text-only \(UniMoETextForCausalLM, no towers\).*: pixel_values, input_values$"):
            call(ids, pixel_values=torch.zeros(1, 3, 28, 28), input_values=torch.zeros(1, 400, 128))


def test_loading_errors_stay_short_and_say_what_the_keys_mean(tmp_path):
    """A towered checkpoint read by the text-only class listed some 200 unexpected keys (12,000 characters); a config
    whose hidden_size does not fit the weights ended in transformers' `ignore_mismatched_sizes` RuntimeError, whose
    shapes were only in a log report. Both are now one short ValueError naming keys, shapes and the likely cause."""
    import json

    from modeling_unimoe import UniMoETextForCausalLM
    from tests.utils.models import make_tiny_text_model

    make_tiny_model(text_only=False).save_pretrained(tmp_path / "towered")
    with pytest.raises(ValueError) as refused:
        UniMoETextForCausalLM.from_pretrained(tmp_path / "towered")
    message = str(refused.value)
    assert len(message) < 1500 and re.search(r"unexpected_keys: .*, \.\.\. and \d+ more", message)
    assert message.endswith("The checkpoint has modality towers: load it with UniMoEForCausalLM (UniMoETextForCausalLM reads text-only checkpoints)")

    make_tiny_text_model().save_pretrained(tmp_path / "flat")
    config_path = tmp_path / "flat" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"hidden_size": 32}))
    for cls in (UniMoETextForCausalLM, UniMoEForCausalLM):
        with pytest.raises(ValueError, match=r"mismatched_keys: lm_head\.weight \(checkpoint \[512, 64\], model \[512, 32\]\).*config\.json does not describe these weights"):
            cls.from_pretrained(tmp_path / "flat")
    # asked for, the loading info is still transformers' own (a mis-shaped weight is its error)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        UniMoETextForCausalLM.from_pretrained(tmp_path / "flat", output_loading_info=True)
