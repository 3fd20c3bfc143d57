"""RFC 9180's test vectors (from the `cryptography-vectors` package) against the HPKE the envelope uses.

`cryptography`'s single-shot HPKE seals with empty associated data and sequence number 0, while the RFC's
vectors use "Count-i" as associated data. So each vector is checked in two steps that together cover the
whole construction: (1) the vector's own ciphertexts open with its key and nonces (the AEAD), and (2) a
ciphertext made with the vector's key schedule output (key, base nonce) and empty associated data opens
through `hpke.Suite.decrypt` with the vector's enc, recipient key and info: the KEM decapsulation and the key
schedule must reproduce the RFC's key and nonce exactly, or it would not.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

KEMS = {0x0020: hpke.KEM.X25519}
KDFS = {0x0001: hpke.KDF.HKDF_SHA256}
AEADS = {0x0001: (hpke.AEAD.AES_128_GCM, AESGCM), 0x0003: (hpke.AEAD.CHACHA20_POLY1305, ChaCha20Poly1305)}


def _vectors() -> list[dict[str, Any]]:
    text = resources.files("cryptography_vectors").joinpath("HPKE/test-vectors.json").read_text()
    return [
        v for v in json.loads(text)
        if v["mode"] == 0 and v["kem_id"] in KEMS and v["kdf_id"] in KDFS and v["aead_id"] in AEADS
    ]  # fmt: skip


VECTORS = _vectors()


def test_the_envelope_suite_has_a_vector() -> None:
    ours = [v for v in VECTORS if (v["kem_id"], v["kdf_id"], v["aead_id"]) == (0x20, 1, 3)]
    assert len(ours) == 1  # DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305: hearth-e2e-v1


@pytest.mark.parametrize(
    "vector", VECTORS, ids=lambda v: f"kem{v['kem_id']}-kdf{v['kdf_id']}-aead{v['aead_id']}"
)
def test_rfc9180_base_mode_vector(vector: dict[str, Any]) -> None:
    h = bytes.fromhex
    aead_id, aead_cls = AEADS[vector["aead_id"]]
    key, base_nonce = h(vector["key"]), h(vector["base_nonce"])
    for i, enc in enumerate(vector["encryptions"][:8]):
        nonce = (int.from_bytes(base_nonce, "big") ^ i).to_bytes(len(base_nonce), "big")
        assert h(enc["nonce"]) == nonce
        assert aead_cls(key).decrypt(nonce, h(enc["ct"]), h(enc["aad"])) == h(enc["pt"])
    suite = hpke.Suite(KEMS[vector["kem_id"]], KDFS[vector["kdf_id"]], aead_id)
    recipient = X25519PrivateKey.from_private_bytes(h(vector["skRm"]))
    assert recipient.public_key().public_bytes_raw() == h(vector["pkRm"])
    plaintext = h(vector["encryptions"][0]["pt"])
    ciphertext = aead_cls(key).encrypt(base_nonce, plaintext, b"")
    assert suite.decrypt(h(vector["enc"]) + ciphertext, recipient, h(vector["info"])) == plaintext
