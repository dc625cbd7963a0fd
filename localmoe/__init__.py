"""The roof: the `localmoe` command (`cli`, `python -m localmoe`) and what only it runs: the
launcher `up` (the whole service on one box) and its embedded Redis (`redis_server`). It imports
the packages below it (host, api, workers, moe_build, moe_core); none of them imports it
(tests/test_layers.py).
"""
