"""Stage 2's models: shapes, gradients, padding that never matters, and the cascade's equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from features.schema import FACE_MAP_SHAPE
from train.config import AUDIO_MODELS, MODEL_NAMES, SPATIOTEMPORAL, TRAINABLE_MODELS
from train.data import STEP_INPUTS
from train.loop import MixedPrecision
from train.models import (
    PAPER_PARAMS, MaskedBatchNorm3d, WeightedEnsemble, build_model, paper_parameter_count, parameter_counts,
    parameter_report,
)

FACE_DIM = 128
CONTEXT_DIM = 40
AUDIO_DIM = 24
NUM_CLASSES = 5
CASCADES = ("caca", "caca-b", "caca-av")


def padded_batch(lengths: list[int], face_dim: int = FACE_DIM, context_dim: int = CONTEXT_DIM,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-aligned rows of the given lengths, padded with large garbage and a NaN in both streams."""
    generator = torch.Generator().manual_seed(seed)
    steps = max(lengths)
    mask = torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]
    face = torch.randn(len(lengths), steps, face_dim, generator=generator)
    context = torch.rand(len(lengths), steps, context_dim, generator=generator)
    for stream in (face, context):
        garbage = 1e4 * torch.randn(stream.shape, generator=generator)
        stream[~mask] = garbage[~mask]
    padded_row = lengths.index(min(lengths))
    face[padded_row, -1, 0] = float("nan")
    context[padded_row, -1, 0] = float("nan")
    return face, context, mask


def padded_inputs(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every model input as `train.data.collate` names them (face, context, face_map: (B, T, 128, 4, 4),
    audio, has_audio, has_face, mask), padded like `padded_batch`: large garbage and a NaN in every input, random
    flags in has_audio and has_face. Valid steps without audio (about a third, never a row's first) hold large garbage
    in their audio row, which the models must never read."""
    face, context, mask = padded_batch(lengths, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    face_map = torch.randn(*mask.shape, *FACE_MAP_SHAPE, generator=generator)
    face_map[~mask] = 1e4 * torch.randn(face_map[~mask].shape, generator=generator)
    face_map[lengths.index(min(lengths)), -1, 0] = float("nan")
    audio = torch.randn(*mask.shape, AUDIO_DIM, generator=generator)
    has_audio = torch.rand(mask.shape, generator=generator) > 0.3
    has_audio[:, 0] = True
    audio[~has_audio] = 1e4 * torch.randn(audio[~has_audio].shape, generator=generator)
    audio[lengths.index(min(lengths)), -1, 0] = float("nan")
    has_face = torch.rand(mask.shape, generator=generator) > 0.4
    return {"face": face, "context": context, "face_map": face_map, "audio": audio, "has_audio": has_audio,
            "has_face": has_face, "mask": mask}


def rows_of(inputs: dict[str, torch.Tensor], row: int, steps: int) -> dict[str, torch.Tensor]:
    return {name: value[row:row + 1, :steps] for name, value in inputs.items()}


def declared_inputs(net: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs `net` declares, by name, as `train.loop.model_inputs` gives them."""
    return {name: inputs[name] for name in net.inputs}


def logits_of(net: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """`net` called as training calls it."""
    return net(declared_inputs(net, inputs), inputs["mask"])


def streams(face: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"face": face, "context": context}


def model(name: str, seed: int = 0, face_dim: int = FACE_DIM, context_dim: int = CONTEXT_DIM) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, context_dim=context_dim, num_classes=NUM_CLASSES, face_dim=face_dim, audio_dim=AUDIO_DIM)


@pytest.mark.parametrize("name", TRAINABLE_MODELS)
def test_every_model_gives_logits_and_finite_gradients_to_every_parameter(name):
    net = model(name).train()
    logits = logits_of(net, padded_inputs([5, 2, 7, 1]))
    assert logits.shape == (4, NUM_CLASSES)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for parameter_name, parameter in net.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", TRAINABLE_MODELS)
def test_padding_gives_the_same_logits_as_each_sequence_alone(name):
    net = model(name).eval()
    lengths = [3, 7, 1, 5]
    inputs = padded_inputs(lengths)
    with torch.no_grad():
        batched = logits_of(net, inputs)
        for row, length in enumerate(lengths):
            alone = logits_of(net, rows_of(inputs, row, length))
            torch.testing.assert_close(batched[row:row + 1], alone, rtol=0, atol=1e-5)


def test_c3d_batch_norm_takes_its_training_statistics_from_valid_steps_only():
    lengths = [3, 7, 1, 5]
    mask = padded_batch(lengths)[2]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(len(lengths), 8, mask.shape[1], *FACE_MAP_SHAPE[1:], generator=generator) * 3 + 2
    x.transpose(1, 2)[~mask] = 1e4
    norm = MaskedBatchNorm3d(8).train()
    out = norm(x, mask[:, None, :, None, None].float())
    # torch's own BatchNorm on the valid steps alone, gathered into one batch of (C, H, W) maps.
    reference = torch.nn.BatchNorm2d(8).train()
    expected = reference(x.transpose(1, 2)[mask])
    torch.testing.assert_close(out.transpose(1, 2)[mask], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(norm.running_mean, reference.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(norm.running_var, reference.running_var, rtol=1e-6, atol=1e-6)


def test_c3d_in_training_gives_the_same_logits_and_statistics_whatever_its_padding():
    lengths = [3, 7, 1, 5]
    inputs = padded_inputs(lengths)
    # More padded steps, holding other garbage: only the valid steps may count.
    longer = dict(inputs, mask=torch.arange(10)[None, :] < torch.tensor(lengths)[:, None])
    longer["face_map"] = -1e4 * torch.ones(len(lengths), 10, *FACE_MAP_SHAPE)
    longer["face_map"][longer["mask"]] = inputs["face_map"][inputs["mask"]]
    nets = [model(SPATIOTEMPORAL).train() for _ in range(2)]
    logits = []
    for net, batch in zip(nets, (inputs, longer)):
        torch.manual_seed(5)  # the same dropout in both
        logits.append(logits_of(net, batch))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
    assert torch.isfinite(logits[0]).all()
    for short_norm, long_norm in zip(nets[0].norms, nets[1].norms):
        torch.testing.assert_close(long_norm.running_mean, short_norm.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(long_norm.running_var, short_norm.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASCADES)
def test_attention_is_zero_on_padding_and_sums_to_one_on_valid_steps(name):
    net = model(name).eval()
    lengths = [3, 7, 1, 5]
    inputs = padded_inputs(lengths)
    with torch.no_grad():
        logits, attention = net.forward_with_attention(declared_inputs(net, inputs), inputs["mask"])
        assert attention.shape == (4, 7, 7)
        for row, length in enumerate(lengths):
            assert (attention[row, :, length:] == 0).all()
            assert (attention[row, length:, :] == 0).all()
            torch.testing.assert_close(attention[row, :length].sum(dim=1), torch.ones(length))
            alone = rows_of(inputs, row, length)
            _, alone_attention = net.forward_with_attention(declared_inputs(net, alone), alone["mask"])
            torch.testing.assert_close(attention[row:row + 1, :length, :length], alone_attention, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, logits_of(net, inputs))


def lstm_cell_by_hand(cell: torch.nn.LSTMCell, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    gates = cell.weight_ih @ x + cell.bias_ih + cell.weight_hh @ h + cell.bias_hh
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4)
    c = torch.sigmoid(forget_gate) * c + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(c), c


def cascade_by_hand(net, given: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The module docstring's equations for one unpadded clip (inputs (T, ...) by name), step by step."""
    if "audio" in given:  # the audio encoder reads [audio ; has_audio], audio zeroed where has_audio is false
        flag = given["has_audio"].float()[:, None]
        given = dict(given, audio=torch.cat([torch.where(flag > 0, given["audio"], 0.0), flag], dim=1))
    first = net.encoders[net.first_stream](given[net.first_stream])
    second = torch.cat([net.encoders[stream](given[stream]) for stream in net.second_streams], dim=1)
    first_outputs, (h_n, c_n) = net.first_rnn(first.unsqueeze(0))
    first_outputs, h, c = first_outputs[0], h_n[-1, 0], c_n[-1, 0]
    rows = []
    for x in second:
        scores = torch.stack([torch.dot(h, key) for key in first_outputs])  # h is the previous step's
        weights = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
        attended = sum(weight * key for weight, key in zip(weights, first_outputs))
        h, c = lstm_cell_by_hand(net.second_rnn, torch.cat([x, attended]), h, c)
        rows.append(weights)
    return net.classifier(h), torch.stack(rows)


@pytest.mark.parametrize("name", CASCADES)
def test_cascade_follows_the_documented_equations(name):
    net = model(name, seed=3).eval()
    lengths = [6, 4]
    inputs = padded_inputs(lengths, seed=3)
    with torch.no_grad():
        logits, attention = net.forward_with_attention(declared_inputs(net, inputs), inputs["mask"])
        for row, length in enumerate(lengths):
            clip = {name: value[row, :length] for name, value in declared_inputs(net, inputs).items()}
            expected_logits, expected_attention = cascade_by_hand(net, clip)
            torch.testing.assert_close(logits[row], expected_logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(attention[row, :length, :length], expected_attention, rtol=0, atol=1e-6)


def test_caca_b_is_caca_with_the_streams_swapped():
    caca = model("caca", face_dim=128, context_dim=128).eval()
    caca_b = model("caca-b", seed=1, face_dim=128, context_dim=128).eval()
    swap = {"encoders.face.": "encoders.context.", "encoders.context.": "encoders.face."}

    def swapped(key: str) -> str:
        prefix = next((prefix for prefix in swap if key.startswith(prefix)), None)
        return key if prefix is None else swap[prefix] + key[len(prefix):]

    caca_b.load_state_dict({swapped(key): value for key, value in caca.state_dict().items()})
    face, context, mask = padded_batch([4, 6, 2], face_dim=128, context_dim=128)
    with torch.no_grad():
        torch.testing.assert_close(caca_b(streams(context, face), mask), caca(streams(face, context), mask))
        assert not torch.allclose(caca_b(streams(face, context), mask), caca(streams(face, context), mask))


def test_build_model_names_the_known_models_and_resolves_aliases():
    with pytest.raises(ValueError) as error:
        build_model("transformer", context_dim=CONTEXT_DIM, num_classes=NUM_CLASSES)
    assert "transformer" in str(error.value)
    assert all(name in str(error.value) for name in (*MODEL_NAMES, *AUDIO_MODELS, "caca-a"))
    caca_a = build_model("caca-a", context_dim=CONTEXT_DIM, num_classes=NUM_CLASSES)
    assert type(caca_a) is type(model("caca")) and caca_a.first_stream == "context"


@pytest.mark.parametrize("name", TRAINABLE_MODELS)
def test_a_model_reads_exactly_the_inputs_it_declares(name):
    net = model(name).eval()
    declared = {"face": ("face",), "context": ("context",), SPATIOTEMPORAL: ("face_map",),
                "audio": ("audio", "has_audio"), "face-audio": ("face", "audio", "has_audio"),
                "caca-av": ("face", "context", "audio", "has_audio")}
    assert net.inputs == declared.get(name, ("face", "context"))
    inputs = padded_inputs([3, 2])
    with torch.no_grad():
        logits = logits_of(net, inputs)
        for name in net.inputs:
            # A frame's audio is heard or not: flipping has_audio reads the garbage of the rows without audio.
            changed = dict(inputs, **{name: ~inputs[name] if name == "has_audio" else inputs[name] + 1})
            assert not torch.allclose(logits_of(net, changed), logits), name
            with pytest.raises(ValueError, match=rf"missing \['{name}'\], not its own \[\]"):
                net({other: inputs[other] for other in net.inputs if other != name}, inputs["mask"])
        for foreign in set(STEP_INPUTS) - set(net.inputs):
            with pytest.raises(ValueError, match=rf"missing \[\], not its own \['{foreign}'\]"):
                net({**declared_inputs(net, inputs), foreign: inputs[foreign]}, inputs["mask"])


def test_an_ensemble_gives_each_member_its_own_inputs_and_takes_exactly_theirs():
    members = [model("caca-av").eval(), model(SPATIOTEMPORAL, seed=1).eval()]
    ensemble = WeightedEnsemble(members, [0.25, 0.75]).eval()
    assert ensemble.inputs == tuple(name for name in STEP_INPUTS if name != "has_face")  # both see: the same steps
    inputs = padded_inputs([3, 2])
    with torch.no_grad():
        expected = sum(w * logits_of(m, inputs).softmax(dim=-1) for w, m in zip((0.25, 0.75), members)).log()
        torch.testing.assert_close(logits_of(ensemble, inputs), expected, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match=r"missing \['face_map'\]"):
            ensemble(declared_inputs(members[0], inputs), inputs["mask"])


def test_an_ensemble_of_a_model_that_sees_and_one_that_only_hears_gives_each_its_own_steps():
    """The ensemble reads every frame with has_face; the member that sees gets each row's frames with a face (all of a
    row's frames where none has one), as it would alone; the member that only hears gets every frame."""
    members = [model("caca").eval(), model("audio", seed=1).eval()]
    ensemble = WeightedEnsemble(members, [0.6, 0.4]).eval()
    assert ensemble.inputs == ("face", "context", "audio", "has_audio", "has_face")
    inputs = padded_inputs([7, 5, 3])
    inputs["has_face"][1] = False  # a clip without a face: every frame
    with torch.no_grad():
        seen = []
        for row, length in enumerate(inputs["mask"].sum(dim=1).tolist()):
            has_face = inputs["has_face"][row, :length]
            frames = has_face.nonzero()[:, 0] if has_face.any() else torch.arange(length)
            alone = {name: inputs[name][row:row + 1, frames] for name in ("face", "context")}
            seen.append(logits_of(members[0], dict(alone, mask=torch.ones(1, len(frames), dtype=torch.bool))))
        heard = logits_of(members[1], inputs).softmax(dim=-1)
        expected = (0.6 * torch.cat(seen).softmax(dim=-1) + 0.4 * heard).log()
        torch.testing.assert_close(logits_of(ensemble, inputs), expected, rtol=0, atol=1e-6)
    assert any(0 < inputs["has_face"][row, :length].sum() < length for row, length in enumerate([7, 5, 3]))


def test_wrong_inputs_are_refused_loudly():
    face, context, mask = padded_batch([3, 2])
    with pytest.raises(AttributeError, match="forward_with_attention"):  # only the CACA models have attention
        model("parallel").forward_with_attention(streams(face, context), mask)
    net = model("caca")
    with pytest.raises(ValueError, match="left-aligned"):
        net(streams(face, context), mask.flip(1))
    with pytest.raises(ValueError, match="at least one"):
        net(streams(face, context), torch.zeros_like(mask))
    with pytest.raises(ValueError, match="context"):
        net(streams(face, context[..., :-1]), mask)
    hearing = model("face-audio")
    inputs = declared_inputs(hearing, padded_inputs([3, 2]))
    with pytest.raises(ValueError, match="has_audio must be bool"):
        hearing(dict(inputs, has_audio=inputs["has_audio"].float()), mask)


@pytest.mark.parametrize("name", AUDIO_MODELS)
def test_a_step_without_audio_is_told_by_its_flag_and_its_row_never_counts(name):
    net = model(name).train()
    inputs = padded_inputs([5, 2, 7, 1])
    silent = dict(inputs, audio=inputs["audio"].masked_fill(~inputs["has_audio"][..., None], 0.0))
    logits = []
    for batch in (inputs, silent):
        torch.manual_seed(2)  # the same dropout
        logits.append(logits_of(net, batch))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    F.cross_entropy(logits[0], torch.tensor([0, 1, 2, 3])).backward()
    assert all(torch.isfinite(parameter.grad).all() for parameter in net.parameters())
    # Zeros heard are not silence: the flag alone changes the result.
    net.eval()
    heard_zeros = dict(silent, has_audio=inputs["mask"].clone())
    with torch.no_grad():
        assert not torch.allclose(logits_of(net, heard_zeros), logits_of(net, silent))


def test_the_paper_gives_no_parameter_count_for_the_models_that_hear():
    for name in AUDIO_MODELS:
        total, core = parameter_counts(model(name))
        assert total > core > 0 and paper_parameter_count(name) == "not given"


def test_parameter_report_lists_every_model_beside_the_paper():
    report = parameter_report(25088, 8)
    rows = {line.split()[0]: line for line in report.splitlines()}
    for name, paper in PAPER_PARAMS.items():
        assert f"{paper / 1e6:.2f}M" in rows[name]
    assert "3.21M" in report  # the 25088->128 context encoder


def clips_with_planted_directions(directions: torch.Tensor, clips: int):
    """Face steps = noise + their class's direction; context pure noise; lengths 2 to 8 (inputs as `padded_inputs`)."""
    labels = torch.arange(clips) % len(directions)
    mask = torch.arange(8)[None, :] < torch.randint(2, 9, (clips, 1))
    face = torch.randn(clips, 8, FACE_DIM) + directions[labels][:, None, :]
    return {"face": face, "context": torch.randn(clips, 8, CONTEXT_DIM), "mask": mask}, labels


def test_face_rnn_learns_a_planted_direction():
    torch.manual_seed(0)
    directions = F.normalize(torch.randn(4, FACE_DIM), dim=1) * 3
    train_inputs, train_labels = clips_with_planted_directions(directions, 64)
    held_out_inputs, held_out_labels = clips_with_planted_directions(directions, 64)
    net = build_model("face", context_dim=CONTEXT_DIM, num_classes=len(directions)).train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        optimiser.zero_grad()
        F.cross_entropy(logits_of(net, train_inputs), train_labels).backward()
        optimiser.step()
    net.eval()
    with torch.no_grad():
        assert (logits_of(net, train_inputs).argmax(dim=1) == train_labels).float().mean() > 0.9
        # 64 clips can be memorised even with random labels; held-out clips show the direction was learnt.
        assert (logits_of(net, held_out_inputs).argmax(dim=1) == held_out_labels).float().mean() > 0.8


@pytest.mark.parametrize("name", TRAINABLE_MODELS)
def test_every_model_trains_under_bfloat16_autocast_close_to_float32(name):
    """`train --precision bfloat16` on the CPU: the forward pass under autocast, weights and
    their gradients in float32, and padding's garbage still never reaching a logit."""
    net = model(name).train()
    inputs = padded_inputs([5, 2, 7, 1])
    torch.manual_seed(1)
    exact = logits_of(net, inputs)
    torch.manual_seed(1)  # the same dropout
    with MixedPrecision(torch.device("cpu"), "bfloat16").forward():
        half = logits_of(net, inputs)
    assert half.dtype == torch.bfloat16, "the model really computes in bfloat16"
    torch.testing.assert_close(half.float(), exact, rtol=0.02, atol=0.01)
    F.cross_entropy(half.float(), torch.tensor([0, 1, 2, 3])).backward()
    for parameter_name, parameter in net.named_parameters():
        assert parameter.dtype == parameter.grad.dtype == torch.float32, parameter_name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, parameter_name
