"""The ``xlearner`` command (:data:`xlearner_cli.main.app`): the top of the stack.

It may import every package of the project (``xlearner``, ``stages``, ``flows``,
``devstack``); it imports all but the library lazily, inside the commands that need
them, so that ``xlearner --help`` and ``xlearner stage ...`` start fast.
"""
