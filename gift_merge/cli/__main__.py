"""``python -m gift_merge.cli``: the same commands as the ``gift-merge`` script."""

from gift_merge.cli import main

main()
