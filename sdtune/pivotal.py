"""Pivotal tuning: token embeddings trained with the LoRA (textual inversion beside it, ``pivotal:``).

Each identifier gets ``pivotal.new_tokens`` new tokens (``sks`` -> ``<sks0><sks1>``) whose input embeddings are
trained for the first ``pivotal.fraction`` of the run, then kept fixed while the LoRA goes on (the "pivot" of
Replicate's cog trainer and diffusers' advanced DreamBooth script). With ``new_tokens: 0`` the identifier's own
rows are trained: as one new token per token of the identifier, each starting at that token's row, which is the same for every
prompt (each occurrence of the identifier is rewritten) and leaves the word itself untouched for other runs
and for LoRA scale 0. Captions and prompts keep saying ``sks``: ``Embeddings.rewrite`` puts the new tokens in its
place just before tokenizing, in training and in every grid sdtune renders (except at LoRA scale 0, which
stays the base model).

The trained rows live outside the text encoders' parameters (``TokenEmbeddings`` holds a reference): PEFT's
state dicts, the LoRA optimizer group and DDP never see them, and the frozen 49,408-row table is neither copied
nor given optimizer state (diffusers' script trains the whole table and restores all other rows each step).

Files: one per identifier, ``embeddings/<identifier>.safetensors`` with one (n, width) tensor per text encoder
under the key AUTOMATIC1111, ComfyUI and diffusers read (``clip_l``, ``clip_g``; ``clip_h`` for SD2), so A1111
users put it in ``embeddings/`` and prompt with its file name, which is the identifier. The kohya file carries
the same vectors as ``bundle_emb.<identifier>.<key>`` (A1111's bundled embeddings).

A CLIP text model whose config says ``eos_token_id: 2`` (every SD checkpoint's) pools at the largest token id,
which a new token would become; ``install`` points it at the real end token, which changes nothing for any
prompt without new tokens (the first end token is both the largest id and the first ``<|endoftext|>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdtune import __version__
from sdtune.embedding_files import (
    BUNDLE_PREFIX,
    MODE_KEY,
    TOKENS_KEY,
    bundle_files,
    bundle_tensors,
    folder_files,
)
from sdtune.errors import SdtuneError
from sdtune.families import Family
from sdtune.files import atomic_path
from sdtune.layout import sort_metadata
from sdtune.runs import EMBEDDINGS_DIR, MARK_KEY
from sdtune.tokens import clip_tokenize

__all__ = ["BUNDLE_PREFIX", "Embeddings", "bind", "bundle_files", "bundle_tensors", "create", "folder_files",
           "from_files"]

STOPPED_AT = "stopped_at"  # in ROWS_FILE: the step the rows stopped training at (0-dim int64), once they have
ROWS_FILE = "embedding_rows.safetensors"  # a checkpoint's training rows (the files hold the EMA's when on)


def token_names(identifier: str, count: int) -> list[str]:
    """The new tokens of ``identifier``: ``<sks0>``, ``<sks1>``, ... (not diffusers' ``<sks>_1`` names, which its
    pipelines expand a second time)."""
    return [f"<{identifier.lower()}{i}>" for i in range(count)]


def config_problems(identifiers: list[str], new_tokens: int, init: str | None) -> list[str]:
    """What is wrong with ``pivotal.*`` for these identifiers, read with CLIP's own BPE (every family's
    tokenizers split words alike): one line each, before any weight loads."""
    problems = []
    if init is not None and not clip_tokenize(init):
        problems.append("pivotal.init: no words in it; fix: e.g. the class noun ('dog'), or leave it unset")
    if init is not None and new_tokens == 0:
        problems.append("pivotal.init: not used with pivotal.new_tokens=0, which starts from the identifier's own "
                        "rows; fix: remove one of them")
    return problems


class TokenEmbeddings(torch.nn.Module):
    """A text encoder's input embedding with some token ids looked up in trained rows instead of the table.

    ``rows`` is a one-element list so that the parameter is not registered here (see the module docstring)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], rows: torch.nn.Parameter):
        super().__init__()
        self.base = base
        self.rows = [rows]
        vocab = max(base.num_embeddings, max(ids) + 1)
        index = torch.full((vocab,), -1, dtype=torch.long, device=base.weight.device)
        index[torch.tensor(ids, device=base.weight.device)] = torch.arange(len(ids), device=base.weight.device)
        self.register_buffer("index", index, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what code asking for the table's dtype or device reads
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: (B, L) -> (B, L, D); ids past the base table (the new tokens) look up row 0 there, unused
        row = self.index[input_ids]
        trained = row >= 0
        embeds = self.base(torch.where(trained, 0, input_ids))
        rows = self.rows[0].to(embeds.dtype)[row.clamp(min=0)]
        return torch.where(trained.unsqueeze(-1), rows, embeds)


@dataclass
class Embeddings:
    """The run's trained token embeddings: per identifier its token strings, per text encoder one (N, width)
    parameter holding every identifier's rows in order."""

    family: Family
    tokens: dict[str, list[str]]  # identifier -> its token strings, <sks0>, <sks1>, ...
    rows: list[torch.nn.Parameter]  # one per text encoder, (N, width), fp32
    ids: list[list[int]]  # per text encoder, the token id of each row
    mode: str = "new"  # MODE_KEY: how the rows started
    # the step the rows stopped training at (the pivot), once they have: checkpoints record it, so a run resumed
    # with a longer train.max_steps (a later pivot) keeps them fixed instead of training them again
    stopped_at: int | None = None
    _installed: list[tuple[Any, Any]] | None = None  # (encoder, its original input embedding)

    # -- prompts
    def rewrite(self, text: str) -> str:
        """``text`` with each identifier replaced by its new tokens."""
        for identifier, tokens in self.tokens.items():
            # CLIP lowercases every prompt, so "Sks" is the identifier too; a word only, never inside another
            text = re.sub(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])", "".join(tokens), text, flags=re.IGNORECASE)
        return text

    # -- the text encoders
    def install(self, tokenizers: list[Any], text_encoders: list[Any]) -> None:
        """Add the new tokens to ``tokenizers`` (``bind``) and route the text encoders' lookups of them to ``rows``."""
        if self._installed is not None:
            self.uninstall()
        self._installed = []
        bind(self, tokenizers)
        for tokenizer, encoder, rows, ids in zip(tokenizers, text_encoders, self.rows, self.ids):
            base = encoder.get_input_embeddings()
            if rows.device != base.weight.device:  # vectors read from a file, on the CPU
                rows.data = rows.data.to(base.weight.device)
            self._installed.append((encoder, base))
            encoder.set_input_embeddings(TokenEmbeddings(base, ids, rows))
            text_model = getattr(encoder, "text_model", None)
            if text_model is not None and getattr(text_model, "eos_token_id", None) == 2:
                text_model.eos_token_id = tokenizer.eos_token_id

    def uninstall(self) -> None:
        """Give the text encoders their own input embeddings back (the added tokens stay, unused)."""
        for encoder, base in self._installed or []:
            encoder.set_input_embeddings(base)
        self._installed = None

    def token_list(self) -> list[str]:
        return [t for tokens in self.tokens.values() for t in tokens]

    def set_training(self, on: bool) -> None:
        for rows in self.rows:
            rows.requires_grad_(on)

    # -- files
    def by_identifier(self) -> dict[str, dict[str, torch.Tensor]]:
        """{identifier: {embedding key: (n, width) fp32 tensor}} (``TextEncoderSpec.embedding_key``)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        start = 0
        for identifier, tokens in self.tokens.items():
            out[identifier] = {spec.embedding_key: rows.detach()[start: start + len(tokens)].float().cpu().clone()
                               for spec, rows in zip(self.family.text_encoders, self.rows)}
            start += len(tokens)
        return out

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``folder/embeddings/<identifier>.safetensors`` per identifier; return the files."""
        directory = Path(folder) / EMBEDDINGS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for identifier, tensors in self.by_identifier().items():
            path = directory / f"{identifier}.safetensors"
            metadata = {TOKENS_KEY: ",".join(self.tokens[identifier]), MODE_KEY: self.mode,
                        MARK_KEY: __version__}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
                sort_metadata(tmp)
            written.append(path)
        return written

    def state(self) -> dict[str, torch.Tensor]:
        """The rows as they train, by text encoder name, and ``stopped_at`` once set (what a checkpoint
        resumes)."""
        state = {spec.name: rows.detach().float().cpu().contiguous()
                 for spec, rows in zip(self.family.text_encoders, self.rows)}
        if self.stopped_at is not None:
            state[STOPPED_AT] = torch.tensor(self.stopped_at, dtype=torch.int64)
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put ``state`` back, refusing another layout (a checkpoint of other identifiers or token counts)."""
        with torch.no_grad():
            for spec, rows in zip(self.family.text_encoders, self.rows):
                tensor = state.get(spec.name)
                if tensor is None or tensor.shape != rows.shape:
                    got = "nothing" if tensor is None else f"shape {tuple(tensor.shape)}"
                    raise SdtuneError(f"checkpoint does not match this run's pivotal tuning ({spec.name} embeddings: "
                                      f"expected {tuple(rows.shape)}, got {got})")
                rows.copy_(tensor.to(rows.device, rows.dtype))
        self.stopped_at = int(state[STOPPED_AT]) if STOPPED_AT in state else None


def _init_rows(table: torch.Tensor, count: int, init_ids: list[int] | None, generator: torch.Generator) -> torch.Tensor:
    """(count, width) starting rows: those of ``init_ids`` in turn (diffusers' initializer_concept), else random
    with the table's spread (diffusers' advanced script)."""
    if init_ids:
        return table[[init_ids[i % len(init_ids)] for i in range(count)]].float().clone()
    noise = torch.randn((count, table.shape[1]), generator=generator)
    return (noise * table.float().std().cpu()).to(table.device)


def create(family: Family, identifiers: list[str], tokenizers: list[Any], text_encoders: list[Any],
           new_tokens: int, init: str | None, seed: int) -> Embeddings:
    """The embeddings to train for ``identifiers`` (``pivotal.*``), their rows initialised, not yet installed
    (``install`` adds the tokens).
    ``new_tokens`` 0: one token per token of the identifier, starting at its rows."""
    generator = torch.Generator().manual_seed(seed)
    # every family's tokenizers split words alike (CLIP's BPE): the first one says how many tokens a word is
    own = {i: tokenizers[0](i, add_special_tokens=False).input_ids for i in identifiers}
    tokens = {i: token_names(i, new_tokens or len(own[i])) for i in identifiers}
    rows = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        table = encoder.get_input_embeddings().weight.detach()
        init_ids = tokenizer(init, add_special_tokens=False).input_ids if init else None
        parts = [_init_rows(table, len(names), init_ids if new_tokens else
                            tokenizer(identifier, add_special_tokens=False).input_ids, generator)
                 for identifier, names in tokens.items()]
        rows.append(torch.nn.Parameter(torch.cat(parts).float().to(table.device)))
    return Embeddings(family, tokens, rows, ids=[], mode="new" if new_tokens else "own")  # ids: at install


def from_files(family: Family, files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
               source: str) -> Embeddings:
    """Embeddings to sample with, from ``{identifier: (tensors, metadata)}`` (sdtune's files, A1111 files, or a
    kohya file's bundle), each needing every text encoder's key."""
    tokens, rows, mode = {}, [[] for _ in family.text_encoders], "new"
    for identifier, (tensors, metadata) in files.items():
        vectors = []
        for spec in family.text_encoders:
            # a one-encoder family: any single tensor is its vectors (A1111's own files say emb_params)
            tensor = tensors.get(spec.embedding_key)
            if tensor is None and len(family.text_encoders) == 1 and len(tensors) == 1:
                tensor = next(iter(tensors.values()))
            if tensor is None:
                raise SdtuneError(f"{source}: the embedding '{identifier}' has no {spec.embedding_key} vectors "
                                  f"for the {spec.label} text encoder (keys: {', '.join(tensors) or 'none'})")
            vectors.append(tensor.reshape(-1, tensor.shape[-1]).float())
        counts = {v.shape[0] for v in vectors}
        if len(counts) != 1:
            raise SdtuneError(f"{source}: the embedding '{identifier}' has different token counts per text encoder")
        mode = metadata.get(MODE_KEY, mode)
        names = metadata.get(TOKENS_KEY, "").split(",") if metadata.get(TOKENS_KEY) else []
        tokens[identifier] = names if len(names) == counts.pop() else token_names(identifier, vectors[0].shape[0])
        for i, v in enumerate(vectors):
            rows[i].append(v)
    params = [torch.nn.Parameter(torch.cat(r), requires_grad=False) for r in rows]
    return Embeddings(family, tokens, params, ids=[], mode=mode)


def bind(embeddings: Embeddings, tokenizers: list[Any]) -> Embeddings:
    """``embeddings`` with the token ids of ``tokenizers`` (adding the new tokens), ready to ``install``."""
    ids = []
    for tokenizer in tokenizers:
        tokenizer.add_tokens(embeddings.token_list())
        ids.append(tokenizer.convert_tokens_to_ids(embeddings.token_list()))
    embeddings.ids = ids
    return embeddings
