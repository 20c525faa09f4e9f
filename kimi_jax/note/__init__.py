"""The technical note: ``note.pdf`` in every bundle, rendered from the bundle's files alone.

:mod:`kimi_jax.note.content` turns the bundle (ledger, manifest.json, anchor, environment record,
provenance labels, stored array shapes, and verify's certification checks) into the note's parts in
the seed note's order; :mod:`kimi_jax.note.pdf` lays them out with fpdf2 and draws the charts as
vector paths; :mod:`kimi_jax.note.safe_text` prints token text safely. The same bundle gives the same
bytes, so ``kimi-jax verify`` re-renders the note and compares.
"""
