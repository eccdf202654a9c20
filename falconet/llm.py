"""The public API: `falconet.load(path)` -> `LLM` with generate / stream / logits / tokenizer.

`LLM` is a face like the server: every call runs through an `Engine` (the same scheduler,
packed forward and sampler the server uses), driven in the caller's thread, so
`llm.generate` and the server return the same tokens for the same request."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from falconet.engine import Engine
from falconet.engine.speculative import DEFAULT_DRAFT_TOKENS
from falconet.errors import AdapterError, CheckpointError, FalconetError, GenerationError
from falconet.generate import Completion
from falconet.models.adapters import PeftAdapter, adapter_layers, read_peft_adapter
from falconet.models.base import CausalLM
from falconet.models.card import (
    GGUF_LICENCE_KEYS,
    ModelCard,
    card_for_config,
    gguf_card,
    read_card,
)
from falconet.models.checkpoint import LAYOUTS, load_hf_weights, read_config
from falconet.models.registry import ModelConfig, for_config
from falconet.nn.linear import Linear
from falconet.nn.lora import LoRALayers, merge
from falconet.parallel import start as start_tensor_parallel
from falconet.quant.plan import check_quant_type
from falconet.sampling import SamplingParams
from falconet.tokenizer import Tokenizer
from falconet.weights.gguf import is_gguf

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# The embedded default model (`falconet train` made it): continues text, for `generate`.
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "falconet-tiny"
# Its answering sibling (`falconet finetune` made it, scripts/train_answer_model.sh):
# answers from numbered passages with a citation, 2,048 positions; `falconet chat` and
# `falconet rag ask` use it when no --model is given.
ANSWER_MODEL_DIR = Path(__file__).parent / "models" / "falconet-tiny-instruct"


def resolve_dtypes(
    dtype: str, config: ModelConfig, device: torch.device
) -> tuple[torch.dtype, torch.dtype]:
    """(weight storage dtype, compute dtype) for a dtype name.

    "auto" keeps the checkpoint's own dtype for the weights (so a bf16 checkpoint stays
    half the size of fp32 and decodes at bf16 bandwidth). On CPU the compute is fp32
    whatever the weights: CPUs without native bf16 matmul run fp32 GEMMs ~4x faster
    than bf16 ones, and fp32 activations are more exact (see linear.py). On GPU the
    compute runs in the weight dtype, as transformers does.
    """
    if dtype == "auto":
        storage = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            config.torch_dtype or "", torch.float32
        )
    elif dtype in DTYPES:
        storage = DTYPES[dtype]
    else:
        raise FalconetError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    compute = torch.float32 if device.type == "cpu" else storage
    return storage, compute


def embedded_model(name: str) -> Path | None:
    """The embedded model called `name` (falconet-tiny, falconet-tiny-instruct), or None."""
    folder = {d.name: d for d in (DEFAULT_MODEL_DIR, ANSWER_MODEL_DIR)}.get(name)
    return None if folder is None or not (folder / "config.json").is_file() else folder


def default_model_path(answering: bool = False) -> Path:
    """The embedded model's folder: the answering one (chat, RAG answers) or the plain one."""
    folder = ANSWER_MODEL_DIR if answering else DEFAULT_MODEL_DIR
    if embedded_model(folder.name) is None:
        raise FalconetError(
            f"the embedded model {folder.name} is missing from {folder.parent} (a broken "
            "install?); pass a Hugging Face Falcon folder with --model PATH"
        )
    return folder


def load(
    path: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    quant: str | None = None,
    tp: int = 1,
    on_worker_failure: Callable[[str], None] | None = None,
    adapter: str | os.PathLike | None = None,
) -> LLM:
    """Load a model: a HF folder (Falcon, or Llama for Falcon3), a .gguf file, None for
    the embedded default model, or an embedded model's name ("falconet-tiny-instruct")
    where no such file or folder exists. The config's model_type picks the classes (models/registry.py).

    progress(done_bytes, total_bytes) is called as tensors load (the CLI draws a bar).
    quant ("q8_0", "q4_0", ...: falconet.quant.plan.QUANT_TYPES) quantizes the matrices
    tensor by tensor while the checkpoint streams in, so a model whose float checkpoint
    is larger than RAM still loads in 4 bits.

    tp > 1 splits the model over `tp` tensor-parallel ranks (falconet/parallel/): this
    process is rank 0 and starts the others (gloo on CPU, NCCL with device="cuda"; under
    `torchrun` it joins the job instead). on_worker_failure(message) is called, from a
    watchdog thread, when a worker dies; call `LLM.close()` to stop the workers.

    adapter: a PEFT LoRA adapter folder applied to every call. Over float weights it is
    merged into them (no cost per token); over quantized ones it runs beside them
    (`LLM.add_adapter`). To serve several adapters, use `add_adapter` for each.
    """
    if adapter is None:
        return _load(path, dtype, device, progress, quant, tp, on_worker_failure)
    if tp != 1:
        raise AdapterError("LoRA adapters run with tp=1 (one process)")
    peft = read_peft_adapter(adapter)  # a bad folder fails before the slow load
    llm = _load(path, dtype, device, progress, quant, tp, on_worker_failure)
    llm.check_adapter_base()
    layers = adapter_layers(peft, llm.model)
    if all(isinstance(llm.model.get_submodule(n), Linear) for n in layers):
        merge(llm.model, layers)
    else:  # quantized (or ternary) layers: the update runs beside them
        llm.add_adapter(peft.folder.resolve().name, peft)
        llm.adapter = peft.folder.resolve().name
    return llm


def _load(
    path: str | os.PathLike | None,
    dtype: str,
    device: str,
    progress: Callable[[int, int], None] | None,
    quant: str | None,
    tp: int,
    on_worker_failure: Callable[[str], None] | None,
) -> LLM:
    if quant is not None:
        quant = check_quant_type(quant)
    if path is not None and not str(path):
        raise FalconetError("model path is empty; give a Hugging Face model folder")
    folder = default_model_path() if path is None else Path(path).expanduser()
    if path is not None and not folder.exists():  # an embedded model by its name
        folder = embedded_model(str(path)) or folder
    dev = _device(device)
    if is_gguf(folder):
        if quant is not None:
            raise FalconetError(
                f"{folder}: quant is for Hugging Face folders; a GGUF file keeps its own types "
                "(write another with `falconet convert --type`)"
            )
        return _load_gguf(folder, dtype, dev, progress, tp, on_worker_failure)
    if not folder.exists():
        raise FalconetError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise FalconetError(
            f"{folder}: expected a Hugging Face model folder (config.json + weights)"
        )
    config = read_config(folder)
    storage, compute = resolve_dtypes(dtype, config, dev)
    tokenizer = Tokenizer.from_dir(folder)
    model = for_config(config).shapes(config, storage, compute)
    advance = _bytes_done(progress, model.weight_bytes() // tp)
    if tp != 1:  # under torchrun too: a job running one model per process keeps tp=1
        model = start_tensor_parallel(folder, config, tp, storage, compute, dev, quant,
                                      progress=advance, on_failure=on_worker_failure)  # fmt: skip
        return LLM(model, tokenizer, folder, read_card(folder, config))
    load_hf_weights(model, folder, advance, quant=quant)
    if dev.type != "cpu":
        model = model.to(dev)
    return LLM(model, tokenizer, folder, read_card(folder, config))


def _bytes_done(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """progress(done, total) fed one tensor's bytes at a time (total: about the bytes this
    process loads)."""
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(min(done, total), total)

    return advance


def _load_gguf(
    path: Path,
    dtype: str,
    dev: torch.device,
    progress: Callable[[int, int], None] | None,
    tp: int,
    on_worker_failure: Callable[[str], None] | None,
) -> LLM:
    from falconet.models.checkpoint import load_gguf_weights, read_gguf
    from falconet.weights.gguf import metadata_strings

    ckpt = read_gguf(path)
    storage, compute = resolve_dtypes(dtype, ckpt.config, dev)
    card = gguf_card(ckpt.config, metadata_strings(ckpt.file.reader, GGUF_LICENCE_KEYS))
    tokenizer = Tokenizer(**ckpt.vocab)
    advance = _bytes_done(progress, ckpt.nbytes // tp)
    if tp != 1:  # each rank reads its own slices of the file
        config = ckpt.config
        del ckpt  # its reader's parsed metadata (the vocabulary: MBs) is not held meanwhile
        model = start_tensor_parallel(path, config, tp, storage, compute, dev, None,
                                      progress=advance, on_failure=on_worker_failure)  # fmt: skip
        return LLM(model, tokenizer, path, card)
    model = for_config(ckpt.config).shapes(ckpt.config, storage, compute)
    load_gguf_weights(model, ckpt, advance)
    if dev.type != "cpu":
        model = model.to(dev)
    return LLM(model, tokenizer, path, card)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise FalconetError(
            f"device {name!r} is not a torch device ({e}); use cpu or cuda"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FalconetError(
            f"device {name!r}: this PyTorch build or machine has no CUDA GPU; use cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise FalconetError(f"device {name!r} is not supported; use cpu or cuda")
    return dev


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise GenerationError("give either a SamplingParams or keyword settings, not both")
    return params or SamplingParams(**sampling)


class LLM:
    # Sequences the caller-driven engine runs at once; more prompts wait their turn.
    MAX_BATCH = 8

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        path: Path | None = None,
        card: ModelCard | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        # family and declared licence (models/card.py); a model built in memory declares none
        self.card = card or card_for_config(model.config, "the model's config")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise CheckpointError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
            )
        self.eos_ids = tuple(sorted(set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)))
        self._engine: Engine | None = None
        # speculative decoding (engine/speculative.py): prompt lookup unless told otherwise
        self.speculative: str | None = "prompt_lookup"
        self.draft: LLM | None = None
        self.draft_tokens = DEFAULT_DRAFT_TOKENS
        # LoRA adapters served beside the base (nn/lora.py) and the one this LLM's own
        # calls use (None: the base model)
        self.adapters: LoRALayers | None = None
        self.adapter: str | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def close(self) -> None:
        """Stop a tensor-parallel model's workers (a one-process model has nothing to stop)."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    def set_speculative(
        self, on: bool = True, draft: LLM | None = None, tokens: int = DEFAULT_DRAFT_TOKENS
    ) -> None:
        """Speculative decoding for this LLM's engine: on (the default) drafts by prompt
        lookup, or with `draft`, a smaller model of the same tokenizer (e.g. Falcon3-1B
        for Falcon3-10B); off decodes one token per step. Outputs are the same either
        way (greedy: the same tokens; sampled: the same distribution)."""
        if draft is not None:
            if not on:
                raise GenerationError("a draft model drafts for speculative decoding; turn it on")
            if draft.tokenizer.backend.get_vocab() != self.tokenizer.backend.get_vocab():
                raise GenerationError(
                    f"the draft model {draft.path} has another tokenizer than {self.path}; "
                    "its tokens would mean other text"
                )
        self.speculative = None if not on else "draft_model" if draft else "prompt_lookup"
        self.draft, self.draft_tokens = draft, tokens
        self._engine = None  # the next call builds an engine with these settings

    def add_adapter(self, name: str, adapter: str | os.PathLike | PeftAdapter) -> None:
        """Serve the PEFT LoRA adapter folder `adapter` as `name` beside the base model:
        requests that name it (`Engine.submit(adapter=name)`, the server's model id) get
        its update, the others the base, in the same batches. AdapterError for a folder
        that is malformed or does not fit this model."""
        self.check_adapter_base()
        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter needs a non-empty name, got {name!r}")
        peft = adapter if isinstance(adapter, PeftAdapter) else read_peft_adapter(adapter)
        layers = adapter_layers(peft, self.model)
        if self.adapters is None:
            self.adapters = LoRALayers(self.model)
        self.adapters.add(name, layers)
        self._engine = None  # the next call builds an engine that knows it

    def check_adapter_base(self) -> None:
        """AdapterError unless this model's layers compute what the HF checkpoint's do,
        which an adapter's updates assume: one process, and not a GGUF file whose layout
        stores other values than the checkpoint (Falcon-H1's muP multipliers folded into
        the weights would leave the updates unscaled)."""
        if not isinstance(self.model, CausalLM):
            raise AdapterError("LoRA adapters run with tp=1 (one process)")
        layout = LAYOUTS.get(for_config(self.config).gguf_architecture)
        if self.path is not None and is_gguf(self.path) and hasattr(layout, "file_config"):
            raise AdapterError(
                f"{self.path}: a {layout.TITLE} GGUF file holds its multipliers folded into "
                "the weights, which LoRA updates do not expect; load the Hugging Face folder"
            )

    def engine(self, context: int = 0) -> Engine:
        """The engine this LLM drives, with room for `context` tokens per sequence (the
        model's context at least; ALiBi and scaled-RoPE models may go past it, as in
        transformers, so a longer request gets a larger engine)."""
        need = max(context, self.config.max_position_embeddings)
        if self._engine is None or self._engine.max_context < need:
            self._engine = Engine.from_llm(
                self, max_batch=self.MAX_BATCH, max_queue=1 << 20, max_context=need
            )
        return self._engine

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(prompt)
        raise GenerationError("prompt must be a str or a list of token ids")

    def complete(
        self, prompts: list[str | list[int]], params: SamplingParams | None = None, **sampling
    ) -> list[Completion]:
        """Several prompts decoded together by the engine. Sampling settings are a
        SamplingParams or its fields as keywords."""
        if not isinstance(prompts, (list, tuple)):
            raise GenerationError("complete() takes a list of prompts; use generate() for one")
        params = _params(params, sampling)
        ids = [self._prompt_ids(p) for p in prompts]
        if not ids:
            raise GenerationError("complete() needs at least one prompt")
        longest = max(len(p) for p in ids) + params.max_tokens
        return self.engine(longest).generate(ids, [params] * len(ids), self.adapter)

    def generate(
        self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.0, **sampling
    ) -> str:
        return self.complete([prompt], max_tokens=max_tokens, temperature=temperature, **sampling)[
            0
        ].text

    def stream(
        self,
        prompt: str | list[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        params: SamplingParams | None = None,
        **sampling,
    ) -> Iterator[str]:
        """Text pieces as they are generated; each is valid UTF-8 and they join to `generate`'s
        text. Settings are keywords, or a whole SamplingParams as `params`."""
        if params is None:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling)
        elif sampling:
            raise GenerationError("give either a SamplingParams or keyword settings, not both")
        ids = self._prompt_ids(prompt)
        engine = self.engine(len(ids) + params.max_tokens)
        [stream] = engine.submit([ids], [params], adapter=self.adapter)
        for delta in engine.iterate(stream):
            if delta.finish_reason == "error":
                raise GenerationError(f"generation failed: {delta.error}")
            if delta.text:
                yield delta.text

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position: float32 (len(ids), vocab)."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise GenerationError("logits: expected a 1-D integer tensor of token ids")
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise GenerationError("logits: expected a list of int token ids")
        ids = list(ids)
        if not ids:
            raise GenerationError("logits: need at least one token id")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise GenerationError(f"logits: token ids must be in [0, {self.config.vocab_size})")
        return self.engine(len(ids)).score([ids], self.adapter)[0]
