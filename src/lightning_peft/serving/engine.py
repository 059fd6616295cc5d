"""One frozen base, many named adapters: load, unload, and greedy generation in which
each row of a batch goes through its own adapter.

Rows for different adapters share one ``generate`` call (or, for requests that score
``choices``, one forward pass): ``mixed_batch`` gathers every
row's LoRA / IA3 weights inside each layer, so a batch of requests for four adapters costs
one pass over the base, not four. ``mix=False`` runs each adapter's rows as a batch of
their own instead (what switching adapters per batch costs; the benchmark's baseline).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_peft.adapters.inputs import HFModel
from lightning_peft.adapters.lora import LoRA
from lightning_peft.checkpoint.metadata import (
    config_from_metadata,
    fingerprint_frozen,
    read_metadata,
)
from lightning_peft.checkpoint.peft_format import CONFIG_FILE, config_from_peft, load_peft
from lightning_peft.checkpoint.state import check_adapter_values, key_mismatch_message
from lightning_peft.errors import (
    AdapterConfigError,
    AdapterStateError,
    TargetModulesError,
    UnsupportedLayerError,
)
from lightning_peft.injection import (
    adapter_configs_attached,
    adapter_parameter_names,
    apply_adapters,
)
from lightning_peft.protocol import routes_rows
from lightning_peft.quantization import (
    QUANT_MODES,
    QuantMode,
    pack_for_cpu_inference_,
    quantize_model,
    standard_layout,
)
from lightning_peft.serving.requests import (
    Job,
    PredictRequest,
    RequestError,
    check_name,
    short,
)
from lightning_peft.switching import (
    adapter_names,
    delete_adapter,
    disable_adapters,
    mixed_batch,
    set_active_adapters,
)
from lightning_peft.undo import restored_on_error

PRECISIONS = QUANT_MODES
# Text longer than this many characters per context token is first tokenized in part.
PREFIX_CHARS = 8
# A folder without any of these holds weights only: requests then send token ids.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class AdapterEngine:
    """A causal LM serving many adapters at once.

    Args:
        model: a transformers causal LM (float or already quantized); put in eval mode.
        tokenizer: its tokenizer, for text prompts (None: requests send ``input_ids``).
        max_new_tokens: the most tokens one request may ask for.
        mix: route every batch's rows per adapter in one pass (else one pass per adapter).
        max_score_tokens: the most tokens one pass that scores ``choices`` may hold (rows x
            width: its logits take that many times the vocabulary's floats); a request's
            choices must fit it, and a batch's are split into passes that fit.
        exact_4bit: keep a 4-bit base in the layout training used (the default for a model
            you pass in, which may train again). False (``from_pretrained``'s default): on a
            CPU with AVX512-BF16 its layers run from bitsandbytes' fast inference layout
            (bfloat16 matmuls, 1.5-1.6x faster generation, what PEFT runs) and give back
            the trained layout exactly whenever an adapter is checked or attached
            (:mod:`lightning_peft.quantization.inference`); answers then differ from the
            float32 evaluation of training in the last bits, as PEFT's do.
    """

    def __init__(
        self,
        model: HFModel,
        tokenizer: Any = None,
        *,
        max_new_tokens: int = 256,
        mix: bool = True,
        max_score_tokens: int = 2048,
        exact_4bit: bool = True,
    ) -> None:
        self.model = model.eval()
        self.exact_4bit = exact_4bit
        self.max_score_tokens = max_score_tokens
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.mix = mix
        self.sources: dict[str, str] = {}
        self.templates: dict[str, str] = {}  # adapter -> the chat template it trained with
        # Generation passes run, rows they held, passes whose rows named 2+ adapters, and
        # requests stopped (or never started) because their client closed its connection.
        self.served = {"passes": 0, "rows": 0, "mixed_passes": 0, "gone": 0}
        config = model.config
        self.vocab_size = config.vocab_size
        self.context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        eos = model.generation_config.eos_token_id
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else eos or [])
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        pad = pad if pad is not None else model.generation_config.pad_token_id
        self.pad = pad if pad is not None else min(self.eos, default=0)
        self.max_token_bytes = _longest_token_bytes(tokenizer)
        if not exact_4bit:
            pack_for_cpu_inference_(self.model)

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        *,
        precision: str | None = None,
        device: str | torch.device = "cpu",
        exact_4bit: bool = False,
        **kwargs: Any,
    ) -> AdapterEngine:
        """The base model (and its tokenizer, when the folder has one) of ``base``, quantized
        to ``precision`` (``"nf4"``, ``"fp4"``, ``"int8"``; None keeps it float); a 4-bit
        base runs from bitsandbytes' fast CPU layout unless ``exact_4bit``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
        model: HFModel = AutoModelForCausalLM.from_pretrained(base)
        folder = Path(base)
        tokenizer = None
        if not folder.is_dir() or any((folder / name).is_file() for name in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(base)
        if precision is not None:
            quantize_model(model, cast(QuantMode, precision), device=device)
        return cls(model.to(device), tokenizer, exact_4bit=exact_4bit, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- adapters --------------------------------------------------------------------------

    def adapters(self) -> list[dict[str, Any]]:
        """Each loaded adapter: its name, method, rank and where it was loaded from."""
        configs = dict(reversed(adapter_configs_attached(self.model)))
        return [_describe(name, configs.get(name), self.sources[name]) for name in self.sources]

    def load(self, name: str, path: str | Path) -> dict[str, Any]:
        """Attach the adapter saved at ``path`` (a PEFT folder or an adapter checkpoint)
        under ``name``; the model is unchanged if it is refused.

        Raises:
            RequestError: 409 for a name in use; 400 for a path that is neither, an adapter
                that cannot share a batch, or one that does not fit this base (shapes, keys,
                or, for checkpoints, the base fingerprint).
        """
        check_name(name, "adapter name")
        if name in self.sources:
            raise RequestError(409, f"an adapter named {name!r} is loaded; DELETE it first")
        # Fingerprints, shapes and the new layers see the base as training saw it.
        with standard_layout(self.model):
            return self._load(name, Path(path))

    def _load(self, name: str, source: Path) -> dict[str, Any]:
        try:
            if (source / CONFIG_FILE).is_file():
                self._load_peft(name, source)
            elif source.is_file():
                self._load_checkpoint(name, source)
            else:
                raise RequestError(
                    400,
                    f"{source} is neither a PEFT folder (with {CONFIG_FILE}) nor an adapter "
                    "checkpoint file on this server",
                )
        except (
            AdapterConfigError,
            AdapterStateError,
            TargetModulesError,
            UnsupportedLayerError,
            FileNotFoundError,
        ) as error:
            raise RequestError(400, _one_line(error)) from error
        except RequestError:
            raise
        except Exception as error:  # a damaged file: what the reader said, for the client
            raise RequestError(
                400, f"{source} could not be loaded: {type(error).__name__}: {_one_line(error)}"
            ) from error
        self.sources[name] = str(source)
        self._probe(name)
        return next(a for a in self.adapters() if a["name"] == name)

    @torch.no_grad()
    def _probe(self, name: str) -> None:
        """Run adapter ``name`` once on a few tokens, and unload it if its logits are not
        finite: finite but huge values (3e38) pass every tensor check and overflow the
        activations, which would answer every request with garbage."""
        ids = torch.arange(min(4, self.vocab_size), device=self.device).view(1, -1)
        with self._routed([name]):
            logits = self.model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            self.unload(name)
            raise RequestError(
                400,
                f"adapter {name!r} overflows this base's activations (its logits on a probe are "
                "not finite): its values are out of range for the model; refused",
            )

    def unload(self, name: str) -> None:
        """Detach adapter ``name`` (404 if none has that name)."""
        if name not in self.sources:
            raise RequestError(404, self.unknown(name))
        delete_adapter(self.model, name)
        del self.sources[name]
        self.templates.pop(name, None)

    def unknown(self, name: str) -> str:
        """Why a request for adapter ``name`` that is not loaded is refused."""
        return f"no adapter named {short(name)}; loaded: {short(list(self.sources), 400)}"

    def _load_peft(self, name: str, folder: Path) -> None:
        _peft_config(folder)
        # The base is the server's, shared by every adapter: never quantized per adapter
        # (load_peft warns when the adapter trained over another storage).
        load_peft(self.model, folder, adapter_name=name, quantize=None)
        self._keep_template(name, _folder_template(folder))

    def _keep_template(self, name: str, template: object) -> None:
        """Remember the chat template adapter ``name`` trained with, if it has one."""
        if isinstance(template, str):
            self.templates[name] = template

    def _load_checkpoint(self, name: str, path: Path) -> None:
        checkpoint, metadata, saved_name, configs = _checkpoint_parts(path)
        template = metadata.get("chat_template")  # the run's, recorded by its checkpoints
        state = {k: v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
        check_adapter_values(state, str(path))
        prefix = self._check_base(metadata, configs, saved_name, state, path)
        with restored_on_error(self.model):
            before = set(adapter_parameter_names(self.model))
            apply_adapters(self.model, configs, name=name, train_head=False)
            expected = set(adapter_parameter_names(self.model)) - before
            renamed = {
                _rename(k[len(prefix) :], saved_name, name, expected): v for k, v in state.items()
            }
            if set(renamed) != set(expected):
                missing = sorted(set(expected) - set(renamed))
                unexpected = sorted(set(renamed) - set(expected))
                raise AdapterStateError(f"{path}: " + key_mismatch_message(missing, unexpected))
            for key, value in renamed.items():
                target = self.model.get_parameter(key)
                if target.shape != value.shape:
                    raise AdapterStateError(
                        f"{path}: {key} has shape {tuple(value.shape)}, this base's adapter "
                        f"{tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(value)
        self._keep_template(name, template)

    def _check_base(
        self,
        metadata: dict[str, Any],
        configs: list[Any],
        saved_name: str,
        state: dict[str, torch.Tensor],
        path: Path,
    ) -> str:
        """Refuse a checkpoint trained on another base; return the prefix its keys carry
        (the LightningModule attribute holding the model, e.g. ``"model."``).

        The fingerprint names frozen tensors as training saw them, so it is computed on a
        copy of the base's modules carrying only this checkpoint's adapter (other adapters
        wrap other layers, which renames their weights: ``q_proj.base_layer.weight``). The
        copy shares every tensor with the served model: a file, refused or not, costs the
        module tree and its own adapter, never a second base.
        """
        _check_ranks(configs, state, path)  # before a rank from the metadata sizes anything
        alone = copy.deepcopy(self.model, memo=_shared_state(self.model))
        for other in adapter_names(alone):
            delete_adapter(alone, other)
        apply_adapters(alone, configs, name=saved_name, train_head=False)
        own = adapter_parameter_names(alone)
        prefix = _prefix(next(iter(state), ""), own)
        if prefix is None or any(not k.startswith(prefix) for k in state):
            missing = sorted(set(own) - {k[len(prefix or "") :] for k in state})
            unexpected = sorted(k for k in state if k[len(prefix or "") :] not in set(own))
            raise AdapterStateError(f"{path}: " + key_mismatch_message(missing, unexpected))
        holder = alone
        for attribute in reversed(prefix.rstrip(".").split(".") if prefix else []):
            parent = nn.Module()
            parent.add_module(attribute, holder)
            holder = parent
        if fingerprint_frozen(holder) != metadata["base_fingerprint"]:
            raise RequestError(
                400,
                f"{path} was trained on another base: its fingerprint differs from this "
                "server's base (check --base and --precision, the quantization it trained under)",
            )
        return prefix

    # -- generation ------------------------------------------------------------------------

    def job(self, request: PredictRequest, check_adapter: bool = True) -> Job:
        """The token ids of ``request``, checked against the context and (unless told not
        to, when the check comes later) the loaded adapters."""
        if check_adapter and request.adapter is not None and request.adapter not in self.sources:
            raise RequestError(404, self.unknown(request.adapter))
        if request.prompt is not None:
            ids = self._tokens(request.prompt, "prompt", special=True)
        elif request.messages is not None:
            size = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in request.messages)
            self._check_text_size(size, "messages")
            ids = self._tokens(self._render(request), "messages", special=False)
        else:
            ids = self._checked_ids(request.input_ids or (), '"input_ids"')
        choices = None
        if request.choices is not None:
            choices = tuple(
                self._tokens(c, "choices", special=False)
                if isinstance(c, str)
                else self._checked_ids(c, '"choices"')
                for c in request.choices
            )
        if choices is not None:
            rows, width = len(choices), len(ids) + max(map(len, choices))
            if rows * width > self.max_score_tokens:
                raise RequestError(
                    400,
                    f"scoring {rows} choices after a {len(ids)}-token prompt takes {rows} rows "
                    f"of {width} tokens; this server scores at most {self.max_score_tokens} "
                    "tokens a request (--max-score-tokens): send fewer or shorter choices",
                )
        longest = max(map(len, choices)) if choices else request.max_new_tokens
        if self.context is not None and len(ids) + longest > self.context:
            what = "its longest choice" if choices else f"max_new_tokens={request.max_new_tokens}"
            raise RequestError(
                400,
                f"the prompt is {len(ids)} tokens; with {what} it passes the model's context "
                f"of {self.context} tokens",
            )
        return Job(
            request.adapter,
            ids,
            request.max_new_tokens,
            choices,
            request.temperature,
            request.top_p,
            request.seed,
            request.stop,
        )

    def _render(self, request: PredictRequest) -> str:
        """The conversation as text, with the template the adapter trained with (recorded
        in its checkpoint or saved with its PEFT folder), else the base tokenizer's."""
        if self.tokenizer is None:
            raise RequestError(400, 'this base has no tokenizer: send "input_ids" instead')
        template = self.templates.get(request.adapter) if request.adapter else None
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    list(request.messages or ()),
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
        except Exception as error:  # no template anywhere, or one that cannot render them
            raise RequestError(
                400, f'"messages" cannot be rendered: {type(error).__name__}: {_one_line(error)}'
            ) from error

    def _tokens(self, text: str, field: str, special: bool) -> tuple[int, ...]:
        if self.tokenizer is None:
            raise RequestError(
                400, f'this base has no tokenizer: send token ids instead of text in "{field}"'
            )
        self._check_text_size(len(text.encode("utf-8", "surrogatepass")), field)
        try:
            self._check_prefix(text, field)
            ids = tuple(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        except RequestError:
            raise
        except Exception as error:  # e.g. a lone surrogate the tokenizer cannot encode
            raise RequestError(
                400, f'"{field}" cannot be tokenized: {type(error).__name__}: {_one_line(error)}'
            ) from error
        if not ids:
            raise RequestError(400, f'"{field}" {text!r} has no tokens')
        return ids

    def _check_prefix(self, text: str, field: str) -> None:
        """Refuse long text whose first ``PREFIX_CHARS x context`` characters alone hold
        more tokens than the context: what lies beyond is not tokenized (a 4 MB prompt of
        ordinary words costs milliseconds, not seconds and hundreds of MiB). Text of few
        tokens per character is tokenized whole, within ``_check_text_size``'s bound."""
        if self.context is None or len(text) <= PREFIX_CHARS * self.context:
            return
        prefix = self.tokenizer(text[: PREFIX_CHARS * self.context], add_special_tokens=False)
        # A word cut at the end may take a few more tokens than it does whole.
        if len(prefix["input_ids"]) > self.context + 8:
            raise RequestError(
                400,
                f'"{field}" holds more than the model\'s context of {self.context} tokens in its '
                f"first {PREFIX_CHARS * self.context} characters (of {len(text)})",
            )

    def _check_text_size(self, size: int, field: str) -> None:
        """Refuse, without tokenizing it, text too long to fit the context whatever its
        tokens: no token covers more than ``max_token_bytes`` bytes (4x that, for
        normalizers that shorten text), so tokenizing megabytes for a refusal is skipped."""
        if self.context is None or self.max_token_bytes is None:
            return
        limit = 4 * self.context * self.max_token_bytes
        if size > limit:
            raise RequestError(
                400,
                f'"{field}" is {size} bytes: more than the model\'s context of '
                f"{self.context} tokens can hold",
            )

    def _checked_ids(self, ids: tuple[int, ...], field: str) -> tuple[int, ...]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RequestError(
                400, f"{field} {bad[:5]} lie outside the vocabulary [0, {self.vocab_size})"
            )
        return ids

    def answer(self, job: Job, output: list[Any]) -> dict[str, Any]:
        """The JSON answer to ``job``, given what :meth:`run` returned for it: the generated
        ids, or each choice's score."""
        if job.choices is not None:
            best = max(range(len(output)), key=output.__getitem__)
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(job.choices[best], skip_special_tokens=True)
            return {"adapter": job.adapter, "choice": best, "text": text, "scores": output}
        text = None
        finish = "stop" if output and output[-1] in self.eos else "length"
        if self.tokenizer is not None:
            text = self.tokenizer.decode(output, skip_special_tokens=True)
            if job.stop and any(stop in text for stop in job.stop):
                output, text = self._until_stop(output, job.stop)
                finish = "stop"
        answer = {"adapter": job.adapter, "text": text, "output_ids": output}
        if job.detail:
            answer.update(finish_reason=finish, prompt_tokens=len(job.input_ids))
        return answer

    def _until_stop(self, output: list[Any], stops: tuple[str, ...]) -> tuple[list[Any], str]:
        """The tokens up to the one that completes the first stop string, and the text
        before that string (OpenAI's ``stop``: not included)."""
        for end in range(1, len(output) + 1):
            text = self.tokenizer.decode(output[:end], skip_special_tokens=True)
            found = [text.find(stop) for stop in stops if stop in text]
            if found:
                return output[:end], text[: min(found)]
        return output, self.tokenizer.decode(output, skip_special_tokens=True)

    @torch.no_grad()
    def run(self, jobs: Sequence[Job]) -> list[list[Any] | Exception]:
        """Each job's output: generated token ids (greedy), or with ``choices`` the log
        probability of each choice (the sum over its tokens). Jobs of one kind run as one
        batch whatever their adapters (one batch per adapter with ``mix=False``).

        A batch that fails is retried row by row, so one bad row fails alone: its entry is
        the exception.
        """
        groups: dict[Any, list[int]] = {}
        for index, job in enumerate(jobs):
            # Rows that sample alike share a pass; a seeded row samples alone (its draws must
            # not depend on who else is in the batch).
            seeded = index if job.seed is not None else -1
            sampling = (job.temperature, job.top_p, job.seed, seeded, job.stop)
            key = (None if self.mix else job.adapter, job.choices is None, sampling)
            groups.setdefault(key, []).append(index)
        results: list[list[Any] | Exception] = [[] for _ in jobs]
        for indices in groups.values():
            # A request whose client left while it waited is not started.
            for index in [i for i in indices if _left(jobs[i])]:
                results[index] = client_gone()
                indices.remove(index)
            if not indices:
                continue
            try:
                outputs: list[list[Any] | Exception] = list(self._run([jobs[i] for i in indices]))
            except Exception:
                outputs = [self._run_or_error(jobs[i]) for i in indices]
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        # Requests stopped (or never started) because their client left.
        self.served["gone"] += sum(isinstance(r, RequestError) and r.status == 499 for r in results)
        return results

    def _run_or_error(self, job: Job) -> list[Any] | Exception:
        try:
            return self._run([job])[0]
        except Exception as error:
            return error

    def _run(self, jobs: Sequence[Job]) -> list[Any]:
        outputs = self._score(jobs) if jobs[0].choices is not None else self._generate(jobs)
        rows = [job.adapter for job in jobs]
        self.served["passes"] += 1
        self.served["rows"] += len(rows)
        self.served["mixed_passes"] += len(set(rows)) > 1
        return outputs

    def _score(self, jobs: Sequence[Job]) -> list[Any]:
        """Every (job, choice) pair as one row of a forward pass, right-padded, so the prompt
        and choice tokens sit at their own positions; a choice's score sums the log
        probabilities of its tokens. Passes hold at most ``max_score_tokens`` tokens (each
        job fits alone: :meth:`job` checked it), and only the choices' positions are
        normalized, so memory follows the budget, not the request. A job whose logits are
        not finite gets an error instead of scores."""
        passes: list[list[Job]] = []
        rows = width = 0
        for job in jobs:
            choices = job.choices or ((),)
            own = len(job.input_ids) + max(map(len, choices))
            wider, more = max(width, own), rows + len(choices)
            if passes and more * wider <= self.max_score_tokens:  # padded to the widest row
                passes[-1].append(job)
                rows, width = more, wider
            else:
                passes.append([job])
                rows, width = len(choices), own
        return [scores for group in passes for scores in self._score_pass(group)]

    def _score_pass(self, jobs: Sequence[Job]) -> list[Any]:
        pairs = [(job, choice) for job in jobs for choice in job.choices or ()]
        width = max(len(job.input_ids) + len(choice) for job, choice in pairs)
        ids = torch.full((len(pairs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (job, choice) in enumerate(pairs):
            tokens = job.input_ids + choice
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        with self._routed([job.adapter for job, _ in pairs]):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        scores = []
        for row, (job, choice) in enumerate(pairs):
            start = len(job.input_ids)
            positions = torch.arange(start - 1, start - 1 + len(choice), device=self.device)
            log_probs = torch.log_softmax(logits.logits[row, positions].float(), dim=-1)
            picked = log_probs[torch.arange(len(choice)), torch.tensor(choice)]
            scores.append(picked.sum().item())
        out: list[Any] = []
        position = 0
        for job in jobs:
            count = len(job.choices or ())
            own = scores[position : position + count]
            out.append(own if all(math.isfinite(x) for x in own) else _not_finite(job))
            position += count
        return out

    def _generate(self, jobs: Sequence[Job]) -> list[Any]:
        """Greedy continuations in one ``generate`` call, or in several where the batch's
        longest prompt plus its largest ``max_new_tokens`` would pass the context (each row
        fits alone: :meth:`job` checked it)."""
        groups = self._fitting_groups(jobs)
        if len(groups) > 1:
            outputs: dict[int, Any] = {}
            for group in groups:
                outputs.update(zip(group, self._generate([jobs[i] for i in group]), strict=True))
            return [outputs[i] for i in range(len(jobs))]
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        width = max(len(job.input_ids) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding: every row's last token at the end
            ids[row, width - len(job.input_ids) :] = torch.tensor(job.input_ids)
            mask[row, width - len(job.input_ids) :] = 1
        first = jobs[0]  # run() groups rows that sample alike
        sampled = first.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(job.max_new_tokens for job in jobs),
            do_sample=sampled,
            temperature=first.temperature if sampled else None,
            top_p=first.top_p if sampled else None,
            top_k=0 if sampled else None,  # OpenAI's sampling has no top-k
            eos_token_id=sorted(self.eos) or None,
            pad_token_id=self.pad,
        )
        watch = _RowWatch(jobs, width, self.eos)
        with self._routed([job.adapter for job in jobs]), _seeded(first.seed):
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([watch.processor]),
                stopping_criteria=StoppingCriteriaList([watch.criteria]),
                # run() groups rows by their stop strings: they end where one appears.
                **(
                    {"stop_strings": list(first.stop), "tokenizer": self.tokenizer}
                    if first.stop and self.tokenizer is not None
                    else {}
                ),
            )
        return [watch.answer(row, tokens) for row, tokens in enumerate(out[:, width:].tolist())]

    def _fitting_groups(self, jobs: Sequence[Job]) -> list[list[int]]:
        """Indices of ``jobs`` in groups whose longest prompt plus largest new-token count
        fits the context: by prompt length, a new group wherever it would not."""
        if self.context is None:
            return [list(range(len(jobs)))]
        groups: list[list[int]] = []
        width = steps = 0
        for index in sorted(range(len(jobs)), key=lambda i: len(jobs[i].input_ids)):
            job = jobs[index]
            wider, longer = max(width, len(job.input_ids)), max(steps, job.max_new_tokens)
            if groups and wider + longer <= self.context:
                groups[-1].append(index)
                width, steps = wider, longer
            else:
                groups.append([index])
                width, steps = len(job.input_ids), job.max_new_tokens
        return [sorted(group) for group in groups]

    @contextmanager
    def _routed(self, rows: list[str | None]) -> Iterator[None]:
        if not self.sources:
            context: Any = nullcontext()
        elif self.mix:
            context = mixed_batch(self.model, rows)
        elif rows[0] is None:
            context = disable_adapters(self.model)
        else:
            set_active_adapters(self.model, [rows[0]])
            context = nullcontext()
        with context:
            yield


def check_adapter_file(path: str | Path) -> None:
    """What can be known of an adapter without a model: its folder or file is readable, its
    method can share a batch. Raises :class:`RequestError` (400) saying what is wrong."""
    source = Path(path)
    try:
        if (source / CONFIG_FILE).is_file():
            _peft_config(source)
        elif source.is_file():
            _checkpoint_parts(source)
        else:
            raise RequestError(
                400,
                f"{source} is neither a PEFT folder (with {CONFIG_FILE}) nor an adapter "
                "checkpoint file",
            )
    except (AdapterConfigError, AdapterStateError) as error:
        raise RequestError(400, _one_line(error)) from error


def _folder_template(folder: Path) -> str | None:
    """The chat template a PEFT folder holds with the tokenizer saved beside its weights."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _peft_config(folder: Path) -> Any:
    """The config of a PEFT folder, refused unless its rows can share a batch."""
    try:
        fields = json.loads((folder / CONFIG_FILE).read_text())
        if not isinstance(fields, dict):
            raise TypeError(f"a JSON object was expected, not {type(fields).__name__}")
        config = config_from_peft(fields)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise AdapterConfigError(f"{folder / CONFIG_FILE}: {_one_line(error)}") from error
    _check_routable([config], folder)
    if fields.get("modules_to_save"):
        raise RequestError(
            400,
            f"{folder} also trains whole modules ({short(fields['modules_to_save'])}), which "
            "requests for other adapters would share; serve it on a base of its own",
        )
    return config


def _checkpoint_parts(path: Path) -> tuple[dict[str, Any], dict[str, Any], str, list[Any]]:
    """``(checkpoint, metadata, adapter name, configs)`` of an adapter checkpoint whose
    rows can share a batch."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code, a truncated file, not a checkpoint
        raise RequestError(
            400,
            f"{path} is not an adapter checkpoint (torch.load with weights_only=True failed: "
            f"{type(error).__name__})",
        ) from error
    metadata = read_metadata(checkpoint, str(path))
    saved_names = {entry["name"] for entry in metadata["adapters"]}
    if len(saved_names) != 1:
        raise RequestError(400, f"{path} holds adapters {sorted(saved_names)}; load one")
    configs = [config_from_metadata(entry) for entry in metadata["adapters"]]
    _check_routable(configs, path)
    return checkpoint, metadata, saved_names.pop(), configs


def client_gone() -> RequestError:
    """The answer to a request whose client closed its connection (nobody reads it; 499 is
    what nginx logs for the same)."""
    return RequestError(499, "the client closed its connection; the work for it was stopped")


def _left(job: Job) -> bool:
    return job.gone is not None and os.path.exists(job.gone)


class _RowWatch:
    """Watches each row of a ``generate`` call between decoding steps: a row whose logits
    are not finite is marked failed (its answer is an error, not tokens read from NaNs),
    and a row whose request passed its deadline, or whose client left, stops there while
    the others go on. ``processor`` and ``criteria`` are what ``generate`` takes as
    ``logits_processor`` and ``stopping_criteria`` (plain callables)."""

    def __init__(self, jobs: Sequence[Job], width: int, eos: set[int]) -> None:
        self.jobs = list(jobs)
        self.width, self.eos = width, eos  # the prompts' padded width; end-of-text tokens
        self.not_finite = torch.zeros(len(jobs), dtype=torch.bool)
        self.late = torch.zeros(len(jobs), dtype=torch.bool)
        self.left = torch.zeros(len(jobs), dtype=torch.bool)
        # Tokens a row had when it was first found late or left (None: never).
        self.flagged_at: list[int | None] = [None] * len(jobs)

    def processor(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # -inf is a mask (min_new_tokens, suppressed tokens in the model's generation config);
        # NaN or +inf is an overflow.
        broken = torch.isnan(scores) | torch.isposinf(scores)
        self.not_finite |= broken.any(dim=-1).cpu()
        return scores

    def criteria(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.monotonic()
        for row, job in enumerate(self.jobs):
            if job.deadline is not None and now > job.deadline:
                self.late[row] = True
            if _left(job):  # a stat of a file that is almost never there: microseconds
                self.left[row] = True
            if (self.late[row] or self.left[row]) and self.flagged_at[row] is None:
                self.flagged_at[row] = input_ids.shape[1] - self.width
        return (self.late | self.not_finite | self.left).to(input_ids.device)

    def answer(self, row: int, tokens: list[int]) -> list[int] | Exception:
        """Row ``row``'s answer from the tokens ``generate`` gave it, or why it has none."""
        job = self.jobs[row]
        answer = _until_eos(tokens, job.max_new_tokens, self.eos)
        if self.not_finite[row]:
            return _not_finite(job)
        flagged = self.flagged_at[row]
        ended = bool(answer) and (answer[-1] in self.eos or len(answer) == job.max_new_tokens)
        if flagged is None or (ended and len(answer) <= flagged):
            return answer  # it had finished before its deadline passed or its client left
        if self.left[row]:
            return client_gone()
        return RequestError(504, "the request passed its deadline (--timeout) while generating")


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draws from ``seed`` inside, the global RNG untouched after (None: no seeding)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _check_ranks(configs: list[Any], state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint whose LoRA rank is not its tensors' (adapters are built from the
    metadata: a claimed rank of 200000 would allocate before any shape check)."""
    ranks = {t.shape[0] for key, t in state.items() if ".lora_A." in key and t.dim() >= 1}
    for config in configs:
        if isinstance(config, LoRA) and ranks and ranks != {config.rank}:
            raise RequestError(
                400,
                f"{path} says rank {config.rank}, but its lora_A tensors have rank "
                f"{sorted(ranks)[:4]}: the metadata does not belong to these tensors",
            )


def _shared_state(model: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that makes a copy of ``model`` share its tensors: parameters,
    buffers, and what layers hold besides (an int8 layer's ``state`` with its weight codes)."""
    shared: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) or type(value).__module__.startswith("bitsandbytes"):
                shared[id(value)] = value
    return shared


def _not_finite(job: Job) -> RuntimeError:
    name = "the base" if job.adapter is None else f"adapter {job.adapter!r}"
    return RuntimeError(f"the logits of {name} are not finite for this request")


def _longest_token_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes one vocabulary entry spells (an upper bound on the text one
    token covers), or None without a tokenizer."""
    try:
        vocabulary = tokenizer.get_vocab() if tokenizer is not None else None
    except Exception:  # a tokenizer without a vocabulary listing: no bound
        return None
    if not vocabulary:
        return None
    return max(len(token.encode("utf-8", "surrogatepass")) for token in vocabulary)


def _until_eos(row: list[int], limit: int, eos: set[int]) -> list[int]:
    row = row[:limit]
    for position, token in enumerate(row):
        if token in eos:
            return row[: position + 1]
    return row


def _check_routable(configs: list[Any], source: Path) -> None:
    for config in configs:
        if not routes_rows(config):
            what = "DoRA" if getattr(config, "use_dora", False) else type(config).__name__
            if what == "Unfreeze":
                what = "whole-module (Unfreeze)"
            raise RequestError(
                400,
                f"{source} is a {what} adapter; requests for different adapters share a batch "
                "only through LoRA (without DoRA) and IA3 layers",
            )


def _rename(key: str, old: str, new: str, expected: set[str]) -> str:
    """``key`` with its adapter name ``old`` replaced by ``new``: the occurrence of ``old``
    whose replacement gives one of the ``expected`` keys (a module may be called like the
    adapter, ``...lora_A.weight.weight`` for an adapter named ``weight``); the last one if
    none does (the key mismatch is then reported)."""
    parts = key.split(".")
    places = [i for i, part in enumerate(parts) if part == old][::-1]
    candidates = [".".join([*parts[:i], new, *parts[i + 1 :]]) for i in places]
    return next((c for c in candidates if c in expected), candidates[0] if candidates else key)


def _prefix(key: str, names: list[str]) -> str | None:
    """What precedes one of ``names`` in checkpoint key ``key`` (None if none fits)."""
    for name in names:
        if key == name:
            return ""
        if key.endswith("." + name):
            return key[: -len(name)]
    return None


def _describe(name: str, config: Any, source: str) -> dict[str, Any]:
    info: dict[str, Any] = {"name": name, "method": type(config).__name__, "source": source}
    if isinstance(config, LoRA):
        info.update(rank=config.rank, alpha=config.alpha)
    return info


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
