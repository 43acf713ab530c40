"""The dataset card of an archive: a ``README.md`` describing its runs, models, texts, licences and provenance."""

from __future__ import annotations

from actsparse.core import format as fmt


def _cell(v) -> str:
    """A Markdown table cell from untrusted manifest text."""
    if isinstance(v, (list, tuple)):
        v = ", ".join(map(str, v))
    return " ".join(str("—" if v in (None, "") else v).split()).replace("|", "\\|")


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def dataset_card(manifests: list[fmt.Manifest], run_bytes: dict[str, int], weights_bytes: dict[str, int]) -> str:
    """The ``README.md`` of an archive: runs, models, corpora, licences, sizes, provenance.

    Args:
        manifests: the manifests of the packed runs.
        run_bytes: bytes of each run (sum of its listed files).
        weights_bytes: bytes of each weights directory.
    """
    from actsparse.core import __version__

    total = sum(run_bytes.values()) + sum(weights_bytes.values())
    tokens = sum(m.n_tokens for m in manifests)
    lines = [
        "# Activation dataset (actsparse)", "",
        f"FFN activations of {len(manifests)} run(s), {tokens:,} tokens in all, {size_text(total)}. Packed by "
        f"actsparse {__version__} (store format {fmt.FORMAT_VERSION}); `archive.json` lists the sha256 of "
        "every file.", "",
        "```", "actsparse unpack ARCHIVE.tar STORE    # checks every checksum before any run becomes visible",
        "actsparse verify STORE", "actsparse runs STORE", "```", "",
        "## Runs", "",
        "| run | model | corpus | split | sites | layers | tokens | sequences | seq_len | stored dtype "
        "| compute dtype | size |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for m in manifests:
        lines.append("| " + " | ".join(_cell(v) for v in (
            m.run_id, m.model.name, m.corpus.name, m.split, list(m.sites), m.n_layers, f"{m.n_tokens:,}",
            m.n_sequences, m.seq_len, m.stored_dtype, m.compute_dtype, size_text(run_bytes[m.run_id]))) + " |")
    models = {m.weights_id: m.model for m in manifests}
    lines += ["", "## Models", "", "| model | source | licence | architecture | FFN | weights sha256 | FFN weights |",
              "|---|---|---|---|---|---|---:|"]
    for wid, mo in models.items():
        ffn = mo.ffn
        shape = f"{ffn.activation}, {ffn.n_layers} layers, d_model {ffn.d_model}, d_ff {ffn.d_ff}"
        lines.append("| " + " | ".join(_cell(v) for v in (
            mo.name, mo.source or mo.spec, mo.license or "unknown", mo.architecture,
            shape, mo.weights_sha256, size_text(weights_bytes.get(wid, 0)))) + " |")
    corpora = {(m.corpus.sha256, m.corpus.name): m.corpus for m in manifests}
    lines += ["", "## Texts", "", "| corpus | licence | description | documents | sha256 |", "|---|---|---|---:|---|"]
    for co in corpora.values():
        lines.append("| " + " | ".join(_cell(v) for v in (
            co.name, co.license or "unknown", co.description, co.n_documents, co.sha256)) + " |")
    lines += [
        "", "## Licences", "",
        "The activations, token texts and FFN weights here are derived from the models and the texts above. "
        "Whoever uses or redistributes them must respect the licence of each model **and** of each text, as "
        "listed in the tables (taken from the run manifests; `unknown` means the licence was not recorded: find "
        "it before sharing further).", "",
        "## Layout", "",
        "- `runs/<run_id>/manifest.json`: full provenance (config, model, tokenizer, corpus, library versions).",
        "- `runs/<run_id>/activations.zarr/<site>`: zarr v3 arrays `[layers, tokens, width]`; `uint16` holds "
        "bfloat16 bit patterns (attribute `logical_dtype`).",
        "- `runs/<run_id>/tokens/part-*.parquet`: one row per token (`token_id`, `token_text`, `document_id`, "
        "`special`, ...), aligned with the token axis.",
        "- `models/<weights_id>/ffn.zarr`: FFN weights of every layer (nn.Linear `[out, in]` layout).",
        "- `checksums.json` in each run and weights directory: sha256 of every file.", "",
        "## Provenance", "",
        "| run | created | completed | torch | transformers | actsparse |", "|---|---|---|---|---|---|",
    ]
    for m in manifests:
        ver = m.versions
        lines.append("| " + " | ".join(_cell(v) for v in (
            m.run_id, m.created, m.completed, ver.get("torch"), ver.get("transformers"), ver.get("actsparse"))) + " |")
    return "\n".join(lines) + "\n"
