"""The merchant's answer to a publication (message type ``query.publish``, server/publish.py).

The merchant checks the publication and every version it carries with the platform key pinned
in its own merchant.toml (``platform_key``), stores them in its mirror (client/model_mirror.py)
and answers *installed* (with the version it now serves) or *refused* with the reason. A serving
process at the merchant picks the new publication up without a restart. The reply carries only
the outcome, the merchant id and version numbers.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, RecordDict

from client.merchant import MerchantConfig
from client.model_mirror import ModelMirror
from common import protocol as P
from common.errors import ConfigError, FedshopError
from common.keys import load_verify_key
from common.publication import (
    PUBLICATION_KEY,
    SERIAL_KEY,
    SERVING_KEY,
    PublishOutcome,
    version_files,
)

log = logging.getLogger(__name__)


def open_mirror(merchant: MerchantConfig) -> ModelMirror:
    """The merchant's mirror, checked with the platform key it pinned."""
    if merchant.platform_key is None:
        raise ConfigError(
            f"merchant {merchant.id} has no platform_key in its configuration: pin the "
            "platform's public key (platform.pub) to receive and serve models"
        )
    return ModelMirror(merchant.models_dir, verify_key=load_verify_key(merchant.platform_key))


def publication_reply(config: ConfigRecord, merchant: MerchantConfig) -> RecordDict:
    """Install the publication in ``config`` into the merchant's mirror; say what happened."""
    status: dict[str, str | int] = {P.MERCHANT_ID: merchant.id}
    try:
        publication = config.get(PUBLICATION_KEY)
        if not isinstance(publication, bytes):
            raise ConfigError(f"publication message without {PUBLICATION_KEY!r} bytes")
        installed = open_mirror(merchant).install(publication, version_files(config))
    except FedshopError as exc:
        reason = exc.one_line()
        log.warning("merchant %s refused a publication: %s", merchant.id, reason)
        status.update({P.OUTCOME: PublishOutcome.REFUSED, P.REASON: reason})
    else:
        log.info(
            "merchant %s installed publication %d: serving v%d%s",
            merchant.id,
            installed.serial,
            installed.serving,
            "" if installed.candidate is None else f", candidate v{installed.candidate}",
        )
        status.update(
            {
                P.OUTCOME: PublishOutcome.INSTALLED,
                P.REASON: installed.reason,
                SERVING_KEY: installed.serving,
                SERIAL_KEY: installed.serial,
            }
        )
    return RecordDict({P.STATUS: ConfigRecord(status)})  # type: ignore[arg-type]
