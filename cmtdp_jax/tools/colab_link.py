"""Prints the "Open in Colab" link of the reproduction notebook for this checkout's GitHub remote.

  python -m cmtdp_jax.tools.colab_link [--remote origin]

Colab opens notebooks straight from GitHub; the notebook then needs `REPO_URL` (its first code
cell) set to the same repository, because Colab has no checkout of it: the link printed here
carries the notebook only.
"""

from __future__ import annotations

import re
import subprocess
import sys

NOTEBOOK = 'launch/colab_reproduce.ipynb'
_GITHUB = re.compile(r'^(?:https://github\.com/|git@github\.com:|ssh://git@github\.com/)'
                     r'(?P<repo>[^/]+/[^/]+?)(?:\.git)?/?$')


def colab_link(remote_url: str, branch: str = 'main') -> str:
  """The Colab URL of the notebook in the GitHub repository `remote_url` (https or ssh)."""
  match = _GITHUB.match(remote_url.strip())
  if not match:
    raise ValueError(f'not a GitHub remote: {remote_url!r} (Colab opens notebooks from GitHub)')
  return f"https://colab.research.google.com/github/{match['repo']}/blob/{branch}/{NOTEBOOK}"


def main(argv=None) -> int:
  args = sys.argv[1:] if argv is None else argv
  remote = args[args.index('--remote') + 1] if '--remote' in args else 'origin'
  try:
    url = subprocess.run(['git', 'remote', 'get-url', remote], check=True, capture_output=True,
                         text=True).stdout
    print(colab_link(url))
  except (OSError, subprocess.CalledProcessError, ValueError) as e:
    detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else e
    print(f'error: git remote {remote}: {detail}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
