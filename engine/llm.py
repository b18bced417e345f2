"""LLM: the notebook API, shaped like vLLM's (generate, chat, score)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from tqdm import tqdm

from engine import scoring
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Messages = list[dict]


class LLM:
    """Offline inference over one model, continuously batched.

    Example:
      llm = LLM()                                   # the embedded default model
      outs = llm.generate(["def fib(n):"], SamplingParams(max_tokens=32, temperature=0))
      print(outs[0].outputs[0].text)
    Engine options (max_num_seqs, page_size, backend, ...) are EngineConfig's fields.
    """

    def __init__(self, model: str | Path | None = None, **engine_options):
        self.engine = LLMEngine(model, EngineConfig(**engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None
                 ) -> list[RequestOutput]:
        """Generates for every prompt at once; returns outputs in the prompts' order.

        Args:
          prompts: a string, {"prompt_token_ids": [...]}, or a list of those.
          sampling_params: one for all prompts, or one per prompt; None takes the model's
            generation_config defaults.
          use_tqdm: show a progress bar (requests, output tokens/s) for more than one prompt.
          priority: per prompt; lower runs first.

        Returns:
          One output per prompt. A request the engine could not run finishes alone with
          finish_reason "error" (the others are unaffected); if the engine itself cannot
          go on, the error is raised and this call's requests are dropped.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.engine.default_sampling_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries: expected one per "
                             f"prompt ({len(prompts)})")
        ids = []
        try:
            for index, (prompt, prompt_params) in enumerate(zip(prompts, params)):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, prompt_params,
                                        priority=priority[index] if priority else 0)
                ids.append(request_id)
        except ValueError as error:
            for request_id in ids:
                self.engine.abort(request_id)
            raise ValueError(f"prompts[{len(ids)}]: {error}") from None
        return self._run(ids, use_tqdm and len(ids) > 1)

    def chat(self, messages: Messages | list[Messages],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates; each
        output's `prompt` is the rendered text (as vLLM's)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation,
                                                 add_generation_prompt=add_generation_prompt,
                                                 **(chat_template_kwargs or {}))
            # Without BOS / EOS: the template writes them.
            prompts.append({"prompt": text,
                            "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def score(self, pairs: list[tuple[str, str]], *, add_bos_token: bool = False,
              use_tqdm: bool = True) -> list[scoring.ScoreResult]:
        """Log-likelihood of each continuation after its context, all pairs batched.

        Tokenizes as lm-evaluation-harness does (engine/scoring.py has the exact rule).

        Returns:
          Per pair: logprob (summed over the continuation tokens), is_greedy (each is the
          argmax), token_logprobs and tokens.
        """
        return scoring.score(self, pairs, add_bos_token=add_bos_token, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], show_progress: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="requests", unit="req", disable=not show_progress)
        start, output_tokens = time.perf_counter(), 0
        while self.engine.has_unfinished_requests():
            try:
                outputs = self.engine.step(final_only=True)
            except Exception:
                for request_id in request_ids:   # the next call starts from a clean engine
                    self.engine.abort(request_id)
                self.engine.recover()
                bar.close()
                raise
            for output in outputs:
                if output.finished:
                    finished[output.request_id] = output
                    output_tokens += output.usage.completion_tokens
                    bar.update(1)
                    rate = output_tokens / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:.1f} output tok/s")
        bar.close()
        return [finished[request_id] for request_id in request_ids]
