"""Metering: API keys, the usage ledger, quotas and usage reports (SQLAlchemy Core; no JAX).

    ledger = Ledger()                                  # or Ledger("postgresql://...")
    key = ledger.authenticate(plaintext)               # None: 401; key.revoked: 403
    decision = ledger.try_admit(request_id, key, model, prompt_tokens + max_tokens,
                                prompt_tokens=prompt_tokens)
    ...                                                # not allowed: 429 (too_large: 400)
    ticket = ledger.record_progress(request_id, prompt, cached, completion)   # as it runs
    ledger.finalize(request_id, "completed", usage.prompt_tokens, usage.cached_tokens,
                    usage.completion_tokens)           # exactly once; False if already final
"""

from engine.metering.keys import ANONYMOUS, KeyInfo
from engine.metering.ledger import Ledger
from engine.metering.quotas import QuotaDecision
from engine.metering.request_log import Price
from engine.metering.schema import FINAL_STATUSES, default_url
from engine.metering.usage import UsageRow

__all__ = ["Ledger", "KeyInfo", "QuotaDecision", "UsageRow", "Price", "ANONYMOUS",
           "FINAL_STATUSES", "default_url"]
