"""Structured outputs: every token of a constrained row follows its grammar (llguidance), the
output parses and validates, JSON is compact, and constrained rows are batch-invariant.

A random-weight model is the hard case for a grammar engine: nothing it would write on its own is
valid, so every token of a valid output is the mask's doing."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import llguidance
import pytest
import torch

from moetron.infer.engine import LLMEngine
from moetron.infer.sampling import Sampler, SamplingState
from moetron.infer.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs
from moetron.infer.structured_output import GrammarCompiler, check, mask_bias
from moetron.serve.responses import TokenText

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "lines": {"type": "integer", "minimum": 0, "maximum": 999},
        "play": {"enum": ["Hamlet", "Macbeth", "Othello"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "lines", "play", "tags"],
    "additionalProperties": False,
}


def _whitespace_outside_strings(text: str) -> bool:
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
        elif char == '"':
            in_string = True
        elif char.isspace():
            return True
    return False


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=400, block_size=8)


def generate(engine: LLMEngine, prompts: list[str], params: list[SamplingParams]) -> list:
    ids = [engine.add_request(engine.tokenizer.encode(p), sp) for p, sp in zip(prompts, params, strict=True)]
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs
    return [finished[i] for i in ids]


def test_mask_is_the_grammar_engines_bitmask_unpacked(tokenizer) -> None:
    """Our row of allowed tokens is llguidance's own bitmask, bit for bit; each allowed token is
    one the grammar accepts (llguidance may narrow forced text to its canonical tokens)."""
    vocab_size = tokenizer.vocab_size + 5  # a model vocabulary padded past the tokenizer's
    state = GrammarCompiler(tokenizer, vocab_size).state(StructuredOutputs(json=json.dumps(SCHEMA)))
    for token in tokenizer.encode('{"name":"ab","lines":12,"play":"Hamlet","tags":[true'):
        allowed_V = mask_bias([state], vocab_size)[0] == 0
        words = torch.frombuffer(bytearray(state.matcher.compute_bitmask()), dtype=torch.int32)
        reference = [t for t in range(vocab_size) if (int(words[t // 32]) >> (t % 32)) & 1]
        assert allowed_V.nonzero().flatten().tolist() == reference and reference
        assert all(state.matcher.validate_tokens([t]) == 1 for t in reference)
        assert not allowed_V[tokenizer.vocab_size :].any()
        assert state.accept(token)


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_always_validates_and_is_compact(engine, seed) -> None:
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=120, structured_outputs=spec)
    (out,) = generate(engine, ["ROMEO:"], [params])[0:1][0]
    assert out.finish_reason == "stop", out.text  # the grammar closed the object: nothing else may follow
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert not _whitespace_outside_strings(out.text), out.text


def test_json_object_regex_choice_and_lark_grammars(engine) -> None:
    specs = {
        "json_object": StructuredOutputs(json_object=True),
        "regex": StructuredOutputs(regex=r"[A-Z]{2,5}: [a-z]{1,8}( [a-z]{1,8}){0,3}\."),
        "choice": StructuredOutputs(choice=("yes", "no", "perhaps")),
        "lark": StructuredOutputs(grammar='start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'),
        "gbnf": StructuredOutputs(grammar='root ::= "ab" [0-9]+ "c"'),
    }
    params = [
        SamplingParams(temperature=0.9, seed=i, max_tokens=200, structured_outputs=s)
        for i, s in enumerate(specs.values())
    ]
    outs = dict(zip(specs, (o[0] for o in generate(engine, ["KING:"] * len(specs), params)), strict=True))
    if outs["json_object"].finish_reason == "stop":
        assert isinstance(json.loads(outs["json_object"].text), dict)
    else:  # a random model may nest deeper than max_tokens; what it wrote is still a JSON prefix
        assert outs["json_object"].text.startswith("{")
    assert re.fullmatch(r"[A-Z]{2,5}: [a-z]{1,8}( [a-z]{1,8}){0,3}\.", outs["regex"].text)
    assert outs["choice"].text in ("yes", "no", "perhaps") and outs["choice"].finish_reason == "stop"
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", outs["lark"].text)
    assert re.fullmatch(r"ab[0-9]+c", outs["gbnf"].text) or outs["gbnf"].finish_reason == "length"


def test_cut_by_max_tokens_reports_length(engine) -> None:
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    (out,) = generate(
        engine, ["ROMEO:"], [SamplingParams(temperature=0.0, max_tokens=3, structured_outputs=spec)]
    )[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3 and out.text.startswith("{")


def test_n_samples_each_follow_the_grammar(engine) -> None:
    spec = StructuredOutputs(choice=("alpha", "beta", "gamma", "delta"))
    outs = generate(
        engine,
        ["HAMLET:"],
        [SamplingParams(n=6, temperature=1.5, seed=3, max_tokens=20, structured_outputs=spec)],
    )[0]
    assert len(outs) == 6 and all(o.text in spec.choice and o.finish_reason == "stop" for o in outs)


def test_min_tokens_never_leaves_a_constrained_row_without_a_token(tokenizer) -> None:
    """min_tokens masks EOS and the stop ids; a finished grammar allows only those (EOS or the
    chat end of turn), so the grammar wins: the row samples one of them, never from all -inf."""
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    state = compiler.state(StructuredOutputs(regex="a"))
    assert state.accept(tokenizer.encode("a")[0])
    ends = [tokenizer.eos_id, tokenizer.end_of_turn_id]
    params = SamplingParams(temperature=0.0, min_tokens=5, max_tokens=10, stop_token_ids=ends[1:])
    sampling = SamplingState(params, [1], [], eos_token_id=tokenizer.eos_id, grammar=state)
    logits = torch.randn(1, tokenizer.vocab_size)
    (token,) = Sampler(tokenizer.eos_id)(logits, [sampling]).token_ids
    assert token == max(ends, key=lambda t: float(logits[0, t]))


def test_bad_grammars_are_refused_naming_the_field() -> None:
    for spec in (
        StructuredOutputs(json='{"type": "foo"}'),
        StructuredOutputs(json="{not json"),
        StructuredOutputs(json="[1, 2]"),
        StructuredOutputs(regex="a("),
        StructuredOutputs(grammar="start: undefined_rule"),
    ):
        with pytest.raises(SamplingParamsError) as e:
            check(spec)
        assert e.value.param == "structured_outputs"
    with pytest.raises(SamplingParamsError):
        StructuredOutputs(json="{}", regex="a")  # exactly one kind
    with pytest.raises(SamplingParamsError):
        StructuredOutputs(choice=())


def test_engine_refuses_a_bad_grammar_at_add_request(engine) -> None:
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request([5, 6], SamplingParams(structured_outputs=StructuredOutputs(regex="(")))
    assert not engine.has_unfinished_requests()


def _run(engine_cfg, model_dir, prompts, params, order) -> dict:
    engine = LLMEngine.from_pretrained(model_dir, **engine_cfg)
    ids = {}
    for i in order:
        ids[engine.add_request(engine.tokenizer.encode(prompts[i]), params[i])] = i
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                o = out.outputs[0]
                finished[ids[out.request_id]] = (
                    o.token_ids,
                    [{t: lp.logprob for t, lp in p.items()} for p in o.logprobs],
                )
    return finished


def test_constrained_and_free_rows_mixed_are_batch_invariant(tiny_model_dir) -> None:
    """A constrained request's tokens and logprobs are bit-identical alone and batched with
    constrained and unconstrained rows in any order and chunking."""
    json_spec = StructuredOutputs(json=json.dumps(SCHEMA))
    prompts = ["ROMEO:", "KING HENRY: my lord", "To be", "First Citizen: before we proceed", "O"]
    params = [
        SamplingParams(temperature=0.7, seed=11, max_tokens=40, logprobs=2, structured_outputs=json_spec),
        SamplingParams(temperature=0.0, max_tokens=25, logprobs=2),
        SamplingParams(
            temperature=0.0,
            max_tokens=30,
            logprobs=2,
            structured_outputs=StructuredOutputs(regex="[a-z ]{5,40}"),
        ),
        SamplingParams(temperature=1.0, seed=4, max_tokens=25, logprobs=2),
        SamplingParams(
            temperature=0.9,
            seed=8,
            max_tokens=30,
            logprobs=2,
            structured_outputs=StructuredOutputs(json_object=True),
        ),
    ]
    cfg = {"num_kv_blocks": 200, "block_size": 8}
    solo = {
        i: _run({**cfg, "max_num_batched_tokens": 256}, tiny_model_dir, prompts, params, [i])[i]
        for i in range(5)
    }
    rng = random.Random(0)
    for budget in (7, 64):
        order = list(range(5))
        rng.shuffle(order)
        batched = _run({**cfg, "max_num_batched_tokens": budget}, tiny_model_dir, prompts, params, order)
        assert batched == solo, f"budget {budget}, order {order}"


def test_constrained_rows_skip_speculation_and_decode_the_same(tiny_model_dir, tokenizer) -> None:
    """n-gram drafts go to free rows only; a greedy constrained row decodes exactly as without them."""
    prompts = ["ROMEO: ROMEO: ROMEO:", "ab ab ab ab ab ab"]
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    params = [
        SamplingParams(temperature=0.0, max_tokens=150, logprobs=1, structured_outputs=spec),
        SamplingParams(temperature=0.0, max_tokens=30, logprobs=1),
    ]
    plain = _run({"num_kv_blocks": 200}, tiny_model_dir, prompts, params, [0, 1])
    speculative = _run(
        {"num_kv_blocks": 200, "speculative_method": "ngram", "num_speculative_tokens": 3},
        tiny_model_dir, prompts, params, [0, 1],
    )  # fmt: skip
    assert speculative[0] == plain[0]
    jsonschema.validate(
        json.loads(LLMEngine.from_pretrained(tiny_model_dir).tokenizer.decode(plain[0][0])), SCHEMA
    )


def test_llguidance_tokenizer_sees_the_vocabulary_as_ours(tokenizer) -> None:
    """The grammar engine decodes every token to the bytes our tokenizer does (a mask that
    disagrees with the tokenizer is the bug class this guards against)."""
    ll = llguidance.LLTokenizer(
        tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id
    )
    ours = TokenText(tokenizer)  # raw bytes per token, as the server reports them
    # llguidance marks special tokens with a leading 0xFF byte, which UTF-8 text never holds: the
    # token for that lone byte is dropped (never allowed), harmless for text.
    never_utf8 = {b"\xff"}
    for token in range(tokenizer.vocab_size):
        if token not in ours.special:
            expected = b"" if ours.bytes(token) in never_utf8 else ours.bytes(token)
            assert ll.decode_bytes([token]) == expected, token
