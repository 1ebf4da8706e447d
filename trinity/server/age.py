"""Encrypted external weights: ``save_weights_external(age_encryption_recipients=[...])``.

As Tinker does (and tinker-cookbook's ``weights.download`` expects), every file of the export is
encrypted to all recipients with age and stored as ``NAME.age``; only the holder of a matching
identity can read the download. Recipients are age X25519 keys (``age1...``) or SSH public keys.
Needs ``pyrage`` (``pip install 'trinity[server-age]'``); without it such a request is a 400.
"""

from __future__ import annotations

from pathlib import Path

from trinity.server.futures import ServiceError

SUFFIX = ".age"


def parse_recipients(keys: list[str]) -> list:
    """The pyrage recipients for ``keys``; a 400 names a key that is not one."""
    try:
        import pyrage
    except ImportError:
        raise ServiceError(
            400,
            "age_encryption_recipients needs the pyrage library on the server "
            "(pip install pyrage), which this server lacks",
        ) from None
    recipients = []
    for key in keys:
        kind = pyrage.ssh if key.startswith("ssh-") else pyrage.x25519
        try:
            recipients.append(kind.Recipient.from_str(key))
        except pyrage.RecipientError as exc:
            raise ServiceError(
                400,
                f"age_encryption_recipients: {key[:16]!r}... is not an age (age1...) or SSH "
                f"public key: {exc}",
            ) from None
    return recipients


def encrypt_directory(directory: Path, recipients: list) -> None:
    """Replace every file under ``directory`` by ``NAME.age``, encrypted to ``recipients``."""
    import pyrage

    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        pyrage.encrypt_file(str(path), str(path) + SUFFIX, recipients)
        path.unlink()
