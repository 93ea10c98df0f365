"""The per-installation affinity key: random, generated once into mitmproxy's confdir.

A fixed default key would let anyone who sees an affinity ID (a log line, a mitmweb comment,
the header sent to the provider) recompute root IDs offline and confirm a guessed first prompt,
and would give every installation the same ID for the same root. So the key is 32
random bytes, written on first start to `<confdir>/affinity-key` (mode 0600) and read back on
every later start. The `affinity_key` option overrides it; gateway instances that must agree on
IDs share the file (or set the same option).
"""

import logging
import os
import secrets
from pathlib import Path

from affinity_addon.request.affinity_id import PUBLIC_KEYS

logger = logging.getLogger(__name__)

KEY_FILE = "affinity-key"
MIN_KEY_CHARS = 16


def check_key(key: str) -> str | None:
    """A warning for a configured key that is public or too short to keep IDs unguessable."""
    if key in PUBLIC_KEYS:
        return ("affinity_key is a key published in the docs: anyone can recompute your affinity "
                "IDs; remove the option to use this installation's random key")
    if len(key) < MIN_KEY_CHARS:
        return (f"affinity_key is shorter than {MIN_KEY_CHARS} characters: IDs can be recomputed "
                "by guessing it; use a long random key")
    return None


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not text:
        raise ValueError(f"{path} is empty: delete it to generate a new key")
    return text


def load_or_create(confdir: str | os.PathLike[str]) -> tuple[str, bool]:
    """(key, generated now). Raises OSError/ValueError when the file can't be read or written."""
    d = Path(confdir).expanduser()
    path = d / KEY_FILE
    key = _read(path)
    if key is not None:
        return key, False
    d.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    try:
        # O_EXCL: two instances starting at once on one confdir agree on the first file written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        existing = _read(path)
        if existing is None:
            raise
        return existing, False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key, True


def resolve(option: str, confdir: str) -> str:
    """The key to use: the option when set, else the confdir's key file (created on first use).

    Never logs a key. When the file can't be written, a random key for this run only is used
    (IDs then change on restart), with a warning.
    """
    if option:
        warning = check_key(option)
        if warning:
            logger.warning("affinity: %s", warning)
        return option
    try:
        key, generated = load_or_create(confdir)
    except (OSError, ValueError) as e:
        logger.warning("affinity: cannot use the key file in %s (%s); using a random key for "
                       "this run only, so affinity IDs change on restart", confdir, e)
        return secrets.token_hex(32)
    if generated:
        logger.info("affinity: generated a random affinity key in %s",
                    Path(confdir).expanduser() / KEY_FILE)
    return key
