"""mkdocs hook: serve the repository files the guides link to from outside docs/.

The guides link to the benchmark plots as ``../benchmarks/results/<name>.png``, the path
that also works when the Markdown is read on a code host. mkdocs only knows files under
docs/, so this registers each such file under that same ``../`` path and copies it into the
site at ``repo/<path>``: the link resolves, and a link to a file that does not exist still
fails ``mkdocs build --strict``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

# Repository files (globs relative to the repository root) the guides may link to.
REPO_FILES = ("benchmarks/results/*.png",)


def on_files(files: Files, config) -> Files:
    docs = Path(config.docs_dir)
    root = docs.parent
    for pattern in REPO_FILES:
        for path in sorted(root.glob(pattern)):
            relative = path.relative_to(root).as_posix()
            files.append(
                File(
                    f"../{relative}",
                    src_dir=str(docs),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                    dest_uri=f"repo/{relative}",
                    # Included explicitly: a "../" path would count as a hidden file.
                    inclusion=InclusionLevel.INCLUDED,
                )
            )
    return files
