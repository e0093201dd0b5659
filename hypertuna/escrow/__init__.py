"""The key escrow: it holds each relay's gateway-writer secret and hands it out, sealed to a
session key, only when the automated policy allows, with every step on a hash-chained audit log.

Modules: :mod:`~hypertuna.escrow.keys` (key files), :mod:`~hypertuna.escrow.package` (sealed
packages), :mod:`~hypertuna.escrow.policy` (rules), :mod:`~hypertuna.escrow.audit` (hash chain),
:mod:`~hypertuna.escrow.store` (SQLite/PostgreSQL), :mod:`~hypertuna.escrow.service` (the domain
API the HTTP edge and the EscrowActor call) and :mod:`~hypertuna.escrow.bus` (revocation fan-out).
"""
