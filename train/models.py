"""Stage 2's models: the paper's six RNNs over per-frame face and context features, its
2D-3D-CNN (`c3d`, section VI) over the per-frame face maps, and three RNNs that also hear the
voice (`audio`, `face-audio`, `caca-av`; not the paper's).

Every model is called as `model(inputs, mask)`: `inputs` maps exactly the names in
`model.inputs` (some of `train.data.STEP_INPUTS`; Face-RNN: face; the fusion models: face and
context; `c3d`: face_map; the models that hear: audio and has_audio besides their others) to
their steps, `face` (B, T, face_dim), `context` (B, T, context_dim), `face_map` (B, T, 128, 4,
4), `audio` (B, T, audio_dim), `has_audio` (B, T) bool (and, for an ensemble that gives its members
their own steps, `has_face` (B, T) bool); `mask` (B, T) bool is True on each
row's valid steps, which come first (left-aligned), at least one per row. Inputs a model does
not declare are not read from the shards, and given to it they are refused (a caller's bug).
The CACA models also give their attention, through `forward_with_attention`. For the RNNs,
padding never reaches a result: LSTMs run on packed sequences, the cascade's step loop keeps
each row's output from its last valid step on, attention gives padded steps weight 0, and the
encoders compute valid steps only, leaving zeros on padding (so a padded input, whatever it
holds, never reaches a result or a gradient).

How this code reads the paper (Sun et al., MEC 2017, sections III-D, IV, V-C), written
here once:

- Encoders. "The feature sizes of face feature and context feature are encoded to 128 by
  fully-connected layers": each stream gets its own trainable Linear(dim, 128), then ReLU,
  then dropout 0.5. The ReLU makes the encoder a feature layer of its own rather than a
  low-rank factor of the LSTM's input weights; the dropout is the models' only one, on the
  layer that holds most of the weights (the 25088-d context encoder alone is 3.2M, against
  about 5k training clips). The paper names no regularisation; 0.5 is the customary rate
  after a fully connected layer.
- Face-RNN, Context-RNN: one stream into a two-layer LSTM of 256; the top layer's output
  at the last valid step into a linear classifier.
- Concatenated-RNN: the two encoded streams concatenated per frame (256-d) into one
  two-layer LSTM of 256; classified as above.
- Parallel-RNN: one two-layer LSTM of 128 per stream; their last valid top-layer outputs
  concatenated (256-d) and "fused by a fully-connected network", read as one linear layer
  straight to the classes. A hidden fusion layer would also fit the words, but with the
  single layer the differences between the paper's counts for the fusion models are
  reproduced to within its rounding (see `parameter_report`).
- CACA-RNN A: the first RNN, a two-layer LSTM of 128, reads the context stream. The second
  RNN, a one-layer LSTM of 128 (an LSTMCell stepped over time), reads the face stream and
  starts from the first RNN's final state: h and c of its top layer at the sequence's last
  valid step. Its input at step i is [encoded face_i ; c_i], where c_i, the paper's "LSTM
  context vector" (not the LSTM's cell state), is Luong's dot global attention over the
  first RNN's top-layer outputs h1_t at all valid steps t:
      a_i,t = softmax_t(h2_{i-1} . h1_t),   c_i = sum_t a_i,t h1_t.
  Eq. 5 scores with h_face_i, but h_face_i is computed from c_face_i (Eq. 4's recurrence),
  so the score uses the previous hidden state h2_{i-1} (h2_0 being the first RNN's final
  h), as attention that feeds the decoder's input does. The prediction is a linear
  classifier on h2 at the last valid step ("the output of face RNN of the last frame"):
  h only, not [h ; c_i], since the paper's output is the LSTM's.
- CACA-RNN B: the same with the streams swapped (first RNN: faces, second RNN: context).
- 2D-3D-CNN (`c3d`): Fig. 4 gives only "3D CNN" layers over the frozen face CNN's maps and
  "adaptive pooling before classifier to handle various length of input"; no sizes. Here:
  two Conv3d 3x3x3 (128->64->64, padding 1) over time x height x width, each followed by
  BatchNorm and ReLU; the average over every valid step and position (the adaptive pooling
  to one cell); dropout 0.5; a linear classifier. Padding never reaches a result: the maps
  are zeroed on padded steps before each convolution (a clip alone meets zeros past its
  last step through the convolution's own padding, so a batched clip must meet the same
  zeros), BatchNorm's training statistics are taken over valid steps only, and the pooling
  averages valid steps only. The paper gives no parameter count for it.
- The voice (the models that hear; the paper has none, its MEC 2017 entry being video only,
  nor a parameter count for them). The audio stream's encoder reads [audio_t ; has_audio_t]:
  Linear(audio_dim + 1, 128), ReLU, dropout 0.5, with audio_t zeroed where has_audio_t is
  false, so that a step without audio is told by its flag, never by values that could be a
  quiet voice, and whatever its row holds never reaches a result. Its steps are train/data.py's:
  every frame for `audio`, which only hears; the frames with a face where it is heard beside
  what is seen.
- Audio-RNN (`audio`): the audio stream alone, as Face-RNN reads faces (two-layer LSTM of 256).
- Face-audio RNN (`face-audio`): Concatenated-RNN over face and audio, [encoded face ; encoded
  audio] per step into a two-layer LSTM of 256.
- CACA-RNN AV (`caca-av`): CACA-RNN A whose second RNN reads what the person shows and says:
  its input at step i is [encoded face_i ; encoded audio_i ; c_i] (384-d), c_i attending over
  the context RNN's states as above; everything else as CACA-RNN A.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from features.recipe import with_setting_defaults
from features.schema import FACE_DIM, FACE_MAP_SHAPE
from train.config import ALIASES, MODEL_NAMES, SPATIOTEMPORAL, TRAINABLE_MODELS
from train.data import STEP_INPUTS, batch_step_mask, steps_every_frame

STREAMS = ("face", "context")  # the paper's
AUDIO = "audio"
HAS_AUDIO = "has_audio"  # the audio stream's flag, read with it by its encoder
HAS_FACE = "has_face"  # read only by an ensemble that gives its members their own steps
# The voice's width where a caller gives none: mean and std of 64 log-mel bands, the extractor's
# default (extract.clips.audio_settings). Callers that know the features pass `feature_dims`.
DEFAULT_AUDIO_DIM = 128

# Table I of the paper; the sizes below are from its sections V-C and V-D. It gives no count for
# c3d, nor for the models that hear (it has none).
PAPER_PARAMS = {
    "face": 1.58e6, "context": 1.19e6, "parallel": 0.86e6, "concat": 1.38e6, "caca": 0.79e6, "caca-b": 0.79e6,
}
NOT_GIVEN = "not given"
PAPER_CONTEXT_DIM = 25088
ENCODED_DIM = 128
ENCODER_DROPOUT = 0.5
LSTM_LAYERS = 2
SINGLE_LSTM_HIDDEN = 256
PARALLEL_LSTM_HIDDEN = 128
CASCADE_HIDDEN = 128
C3D_CHANNELS = 64
C3D_KERNEL = 3
C3D_DROPOUT = 0.5


def check_input_names(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """`inputs` must name exactly what `model` declares: anything else is a caller's bug, never silently ignored."""
    missing = [name for name in model.inputs if name not in inputs]
    foreign = [name for name in inputs if name not in model.inputs]
    if missing or foreign:
        raise ValueError(f"{type(model).__name__} takes exactly the inputs {model.inputs}; "
                         f"missing {missing}, not its own {foreign}")


def checked_lengths(mask: torch.Tensor, inputs: dict[str, torch.Tensor], dims: dict[str, int]) -> torch.Tensor:
    """Each row's number of valid steps, on the CPU (where packing wants it), after checking the batch.

    `inputs` holds each input this model reads by name, `dims` its feature size.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be bool (batch, steps), got {mask.dtype} {tuple(mask.shape)}")
    for name, dim in dims.items():
        if inputs[name].shape != (*mask.shape, dim):
            raise ValueError(f"{name} must be {(*mask.shape, dim)} like mask, got {tuple(inputs[name].shape)}")
    return checked_mask_lengths(mask)


def checked_mask_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Each row's number of valid steps, on the CPU, after checking the mask is left-aligned with no empty row."""
    lengths = mask.sum(dim=1)
    if bool((lengths < 1).any()):
        raise ValueError("every sequence needs at least one valid step")
    steps = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, steps[None, :] < lengths[:, None]):
        raise ValueError("mask must be left-aligned: each row's valid steps first, then padding")
    return lengths.cpu()


def run_lstm(lstm: nn.LSTM, steps: torch.Tensor,
             lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-layer outputs (B, T, H), zero on padding, and the top layer's h and c at each row's last valid step."""
    packed = pack_padded_sequence(steps, lengths, batch_first=True, enforce_sorted=False)
    outputs, (h, c) = lstm(packed)
    outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=steps.shape[1])
    return outputs, h[-1], c[-1]


def two_layer_lstm(input_size: int, hidden_size: int) -> nn.LSTM:
    return nn.LSTM(input_size, hidden_size, num_layers=LSTM_LAYERS, batch_first=True)


def stream_encoder(input_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_dim, ENCODED_DIM), nn.ReLU(), nn.Dropout(ENCODER_DROPOUT))


def encoder_width(stream: str, dim: int) -> int:
    """What a stream's encoder reads per step: its features, and the audio stream its flag too."""
    return dim + 1 if stream == AUDIO else dim


def heard(audio: torch.Tensor, has_audio: torch.Tensor) -> torch.Tensor:
    """The audio stream as its encoder reads it, [audio ; has_audio] per step, audio zeroed where has_audio is false."""
    if has_audio.dtype != torch.bool or has_audio.shape != audio.shape[:2]:
        raise ValueError(f"has_audio must be bool {tuple(audio.shape[:2])} like audio, got {has_audio.dtype}"
                         f" {tuple(has_audio.shape)}")
    flag = has_audio.unsqueeze(2)
    # Filled, not multiplied by the flag: a NaN or inf in a row without audio would survive a product.
    return torch.cat([audio.masked_fill(~flag, 0.0), flag.to(audio.dtype)], dim=2)


def encoded_steps(encoder: nn.Sequential, steps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`encoder` over a stream's valid steps only, (B, T, 128) with zeros on padding.

    Padded steps are often half of a batch's rows, and the context encoder's 25088-d rows are
    most of a model's arithmetic, so they are never computed (nor read: a NaN there cannot
    reach a gradient). Dropout runs over the whole (B, T, 128), so it draws the same random
    numbers whatever the padding. Steps come in any float dtype (float16 as stored) and are
    computed in the encoder's.
    """
    linear, relu, dropout = encoder
    rows = relu(linear(steps[mask].to(linear.weight.dtype)))
    out = rows.new_zeros((*mask.shape, rows.shape[1]))
    out[mask] = rows
    return dropout(out)


def attention_weights(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Luong's dot attention of `query` (B, H) over `keys` (B, T, H): softmax over the valid steps, (B, T)."""
    scores = torch.bmm(keys, query.unsqueeze(2)).squeeze(2)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


class EmotionRNN(nn.Module):
    """What all the RNNs share: the input checks, the zeroed padding and one encoder per stream used.

    `streams` are some of face, context and audio; `dims` has each one's stored width.
    """

    def __init__(self, streams: tuple[str, ...], dims: dict[str, int]):
        super().__init__()
        read = {*streams, *([HAS_AUDIO] if AUDIO in streams else [])}
        self.inputs = tuple(name for name in STEP_INPUTS if name in read)
        self.dims = {stream: dims[stream] for stream in self.inputs if stream in streams}
        self.encoders = nn.ModuleDict({stream: stream_encoder(encoder_width(stream, dim))
                                       for stream, dim in self.dims.items()})

    def encode(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The encoded streams this model uses, by name, and the rows' lengths."""
        check_input_names(self, inputs)
        lengths = checked_lengths(mask, inputs, self.dims)
        steps = {**inputs, AUDIO: heard(inputs[AUDIO], inputs[HAS_AUDIO])} if AUDIO in self.dims else inputs
        encoded = {stream: encoded_steps(encoder, steps[stream], mask) for stream, encoder in self.encoders.items()}
        return encoded, lengths

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        encoded, lengths = self.encode(inputs, mask)
        return self.classify(encoded, lengths)

    def classify(self, encoded: dict, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SingleStreamRNN(EmotionRNN):
    """Face-RNN, Context-RNN or Audio-RNN."""

    def __init__(self, stream: str, dims: dict[str, int], num_classes: int):
        super().__init__((stream,), dims)
        self.stream = stream
        self.rnn = two_layer_lstm(ENCODED_DIM, SINGLE_LSTM_HIDDEN)
        self.classifier = nn.Linear(SINGLE_LSTM_HIDDEN, num_classes)

    def classify(self, encoded: dict, lengths: torch.Tensor) -> torch.Tensor:
        _, last, _ = run_lstm(self.rnn, encoded[self.stream], lengths)
        return self.classifier(last)


class ConcatenatedRNN(EmotionRNN):
    """Concatenated-RNN over `streams` (the paper's: face and context)."""

    def __init__(self, streams: tuple[str, ...], dims: dict[str, int], num_classes: int):
        super().__init__(streams, dims)
        self.streams = streams
        self.rnn = two_layer_lstm(len(streams) * ENCODED_DIM, SINGLE_LSTM_HIDDEN)
        self.classifier = nn.Linear(SINGLE_LSTM_HIDDEN, num_classes)

    def classify(self, encoded: dict, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.cat([encoded[stream] for stream in self.streams], dim=2)
        _, last, _ = run_lstm(self.rnn, steps, lengths)
        return self.classifier(last)


class ParallelRNN(EmotionRNN):
    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__(STREAMS, dims)
        self.rnns = nn.ModuleDict({stream: two_layer_lstm(ENCODED_DIM, PARALLEL_LSTM_HIDDEN) for stream in STREAMS})
        self.classifier = nn.Linear(len(STREAMS) * PARALLEL_LSTM_HIDDEN, num_classes)

    def classify(self, encoded: dict, lengths: torch.Tensor) -> torch.Tensor:
        lasts = [run_lstm(self.rnns[stream], encoded[stream], lengths)[1] for stream in STREAMS]
        return self.classifier(torch.cat(lasts, dim=1))


class CascadeAttentionRNN(EmotionRNN):
    """CACA-RNN: `first_stream` feeds the first RNN; `second_streams`, concatenated per step, the attending second."""

    def __init__(self, first_stream: str, second_streams: tuple[str, ...], dims: dict[str, int], num_classes: int):
        super().__init__((first_stream, *second_streams), dims)
        self.first_stream = first_stream
        self.second_streams = second_streams
        self.first_rnn = two_layer_lstm(ENCODED_DIM, CASCADE_HIDDEN)
        self.second_rnn = nn.LSTMCell(len(second_streams) * ENCODED_DIM + CASCADE_HIDDEN, CASCADE_HIDDEN)
        self.classifier = nn.Linear(CASCADE_HIDDEN, num_classes)

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(inputs, mask)[0]

    def forward_with_attention(self, inputs: dict[str, torch.Tensor],
                               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits, and the attention weights (B, T_second, T_first), zero on padding."""
        encoded, lengths = self.encode(inputs, mask)
        return self.cascade(encoded, mask, lengths)

    def cascade(self, encoded: dict, mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first_outputs, h, c = run_lstm(self.first_rnn, encoded[self.first_stream], lengths)
        second_steps = torch.cat([encoded[stream] for stream in self.second_streams], dim=2)
        attention_rows = []
        for step in range(second_steps.shape[1]):
            weights = attention_weights(h, first_outputs, mask)
            attended = torch.bmm(weights.unsqueeze(1), first_outputs).squeeze(1)
            h_next, c_next = self.second_rnn(torch.cat([second_steps[:, step], attended], dim=1), (h, c))
            # Rows are left-aligned, so no valid step follows a padded one: keeping h on padded
            # steps leaves each row's output at its last valid step, and c is never read again.
            valid = mask[:, step].unsqueeze(1)
            h = torch.where(valid, h_next, h)
            c = c_next
            attention_rows.append(weights * valid)
        return self.classifier(h), torch.stack(attention_rows, dim=1)


class MaskedBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm over (B, C, T, H, W) whose training statistics come from valid steps only."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`valid` (B, 1, T, 1, 1) float, 1 on valid steps; evaluation uses the running statistics as usual."""
        if not self.training:
            return super().forward(x)
        weight = valid.expand(x.shape[0], 1, *x.shape[2:])
        count = weight.sum()
        mean = (x * weight).sum(dim=(0, 2, 3, 4)) / count
        centred = (x - mean[None, :, None, None, None]) * weight
        variance = (centred ** 2).sum(dim=(0, 2, 3, 4)) / count
        with torch.no_grad():
            unbiased = variance * count / (count - 1).clamp_min(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight / torch.sqrt(variance + self.eps)
        shape = (1, -1, 1, 1, 1)
        return (x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


class SpatiotemporalCNN(nn.Module):
    """The 2D-3D-CNN of the paper's Fig. 4 over the frozen face CNN's maps; see the module notes."""

    inputs = ("face_map",)

    def __init__(self, num_classes: int):
        super().__init__()
        channels = (FACE_MAP_SHAPE[0], C3D_CHANNELS, C3D_CHANNELS)
        self.convs = nn.ModuleList(
            nn.Conv3d(c_in, c_out, C3D_KERNEL, padding=C3D_KERNEL // 2) for c_in, c_out in zip(channels, channels[1:])
        )
        self.norms = nn.ModuleList(MaskedBatchNorm3d(c_out) for c_out in channels[1:])
        self.dropout = nn.Dropout(C3D_DROPOUT)
        self.classifier = nn.Linear(C3D_CHANNELS, num_classes)

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        check_input_names(self, inputs)
        face_map = inputs["face_map"].to(self.classifier.weight.dtype)  # float16 as stored, or float32
        if face_map.dim() != 5 or face_map.shape[2:] != FACE_MAP_SHAPE:
            raise ValueError(f"c3d needs face_map (batch, steps, {', '.join(map(str, FACE_MAP_SHAPE))}), got "
                             f"{tuple(face_map.shape)}")
        if mask.dtype != torch.bool or mask.shape != face_map.shape[:2]:
            raise ValueError(f"mask must be bool {tuple(face_map.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
        checked_mask_lengths(mask)
        padding = ~mask[:, None, :, None, None]
        valid = (~padding).to(face_map.dtype)
        x = face_map.transpose(1, 2)  # (B, C, T, H, W): the layout Conv3d wants
        for conv, norm in zip(self.convs, self.norms):
            # Filled, not multiplied by 0: a NaN or inf on a padded step would survive a product.
            x = torch.relu(norm(conv(x.masked_fill(padding, 0.0)), valid))
        pooled = (x * valid).sum(dim=(2, 3, 4)) / (valid.sum(dim=(2, 3, 4)) * x.shape[3] * x.shape[4])
        return self.classifier(self.dropout(pooled))


class WeightedEnsemble(nn.Module):
    """Members' class probabilities, linearly weighted; returns their log, so softmax gives them back.

    Members step through the same frames, or, when some see and some only hear (train/data.py's policy), the
    ensemble reads every frame with has_face and gives each member its own steps."""

    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        own_steps = len({steps_every_frame(member.inputs) for member in members}) > 1
        self.inputs = tuple(name for name in STEP_INPUTS
                            if any(name in member.inputs for member in members) or (name == HAS_FACE and own_steps))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        check_input_names(self, inputs)
        probabilities = [member(*self.member_steps(member, inputs, mask)).softmax(dim=-1) for member in self.members]
        return torch.log(sum(w * p for w, p in zip(self.weights, probabilities)))

    def member_steps(self, member: nn.Module, inputs: dict[str, torch.Tensor],
                     mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A member's inputs and mask: the ensemble's own, or, where it reads every frame for members that do not,
        the member's steps among them."""
        own = {name: inputs[name] for name in member.inputs}
        if HAS_FACE not in self.inputs or steps_every_frame(member.inputs):
            return own, mask
        return steps_first(own, batch_step_mask(inputs[HAS_FACE], mask, member.inputs))


def steps_first(inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inputs with each row's steps where `keep` (B, T) is True moved to its front, in time order, and the mask
    of those steps. What follows them is the rows' other frames: padding, which no model reads."""
    lengths = keep.sum(dim=1)
    order = torch.sort((~keep).to(torch.int32), dim=1, stable=True).indices[:, :int(lengths.max())]
    moved = {}
    for name, steps in inputs.items():
        index = order.reshape(*order.shape, *[1] * (steps.dim() - 2)).expand(-1, -1, *steps.shape[2:])
        moved[name] = torch.gather(steps, 1, index)
    return moved, torch.arange(order.shape[1], device=keep.device)[None, :] < lengths[:, None]


# The models that concatenate streams per step, and the cascades' first stream and second streams.
CONCATENATED = {"concat": STREAMS, "face-audio": ("face", AUDIO)}
CASCADES = {"caca": ("context", ("face",)), "caca-b": ("face", ("context",)), "caca-av": ("context", ("face", AUDIO))}


def feature_dims(attrs: dict) -> dict[str, int]:
    """`build_model`'s context_dim and audio_dim for features of these attributes (audio_dim 0 without audio)."""
    return {"context_dim": int(attrs["context_dim"]), "audio_dim": int(with_setting_defaults(attrs)["audio_dim"])}


def build_model(name: str, context_dim: int, num_classes: int, face_dim: int = FACE_DIM,
                audio_dim: int = DEFAULT_AUDIO_DIM) -> nn.Module:
    """One of `TRAINABLE_MODELS` (or an alias in `ALIASES`), untrained."""
    name = ALIASES.get(name, name)
    dims = {"face": face_dim, "context": context_dim, AUDIO: audio_dim}
    if name in dims:
        return SingleStreamRNN(name, dims, num_classes)
    if name in CONCATENATED:
        return ConcatenatedRNN(CONCATENATED[name], dims, num_classes)
    if name == "parallel":
        return ParallelRNN(dims, num_classes)
    if name in CASCADES:
        return CascadeAttentionRNN(*CASCADES[name], dims, num_classes)
    if name == SPATIOTEMPORAL:
        return SpatiotemporalCNN(num_classes)
    known = ", ".join([*TRAINABLE_MODELS, *(f"{alias} (= {target})" for alias, target in ALIASES.items())])
    raise ValueError(f"unknown model '{name}'; known models: {known}")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the stream encoders); `c3d` has no stream encoders. Any model,
    the paper's or not (`paper_parameter_count` says NOT_GIVEN for those it does not count)."""
    total = sum(p.numel() for p in model.parameters())
    encoders = sum(p.numel() for p in model.encoders.parameters()) if isinstance(model, EmotionRNN) else 0
    return total, total - encoders


def paper_parameter_count(name: str) -> str:
    return f"{PAPER_PARAMS[name] / 1e6:.2f}M" if name in PAPER_PARAMS else NOT_GIVEN


def parameter_report(context_dim: int, num_classes: int) -> str:
    """Our parameter counts beside Table I's, with what the comparison shows."""
    counts = {name: parameter_counts(build_model(name, context_dim, num_classes)) for name in MODEL_NAMES}
    lines = [f"{'model':<10}{'ours total':>12}{'w/o encoders':>14}{'paper':>9}{'paper - w/o enc.':>18}"]
    for name, (total, core) in counts.items():
        paper = PAPER_PARAMS[name]
        lines.append(f"{name:<10}{total / 1e6:>11.2f}M{core / 1e6:>13.2f}M{paper / 1e6:>8.2f}M"
                     f"{(paper - core) / 1e6:>+17.2f}M")
    lines += comparison_notes({name: core for name, (_, core) in counts.items()}, context_dim)
    return "\n".join(lines)


def comparison_notes(core_counts: dict[str, int], context_dim: int) -> list[str]:
    """What the counts outside the encoders say about what Table I counted."""
    encoder = {dim: sum(p.numel() for p in stream_encoder(dim).parameters())
               for dim in (FACE_DIM, context_dim, PAPER_CONTEXT_DIM)}
    fusion = ("concat", "parallel", "caca")
    offsets = {name: PAPER_PARAMS[name] - core_counts[name] for name in fusion}
    offset = sum(offsets.values()) / len(offsets)
    per_model = ", ".join(f"{name} +{value / 1e6:.3f}M" for name, value in offsets.items())
    return [
        f"Encoders: face {FACE_DIM}->{ENCODED_DIM} {encoder[FACE_DIM] / 1e6:.3f}M, context {context_dim}->"
        f"{ENCODED_DIM} {encoder[context_dim] / 1e6:.3f}M. The paper does not say whether it counts encoders; "
        f"its context encoder ({PAPER_CONTEXT_DIM}->{ENCODED_DIM}, {encoder[PAPER_CONTEXT_DIM] / 1e6:.2f}M) would "
        f"exceed its whole Context-RNN, so that one is excluded.",
        f"Fusion models: the paper's counts exceed ours without encoders by the same amount ({per_model}; "
        f"Table I rounds to 0.01M), so their differences match ours. The constant fits one counted encoder "
        f"from a ~{offset / ENCODED_DIM - 1:.0f}-d input to {ENCODED_DIM}; the paper gives no such input size.",
        f"Face-RNN and Context-RNN do not fit: the same architecture is given {PAPER_PARAMS['face'] / 1e6:.2f}M "
        f"and {PAPER_PARAMS['context'] / 1e6:.2f}M, where that constant would give "
        f"{(core_counts['face'] + offset) / 1e6:.2f}M to both. Left unexplained; nothing here is resized to "
        f"hit Table I.",
    ]
