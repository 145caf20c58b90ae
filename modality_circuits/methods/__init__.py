"""The method: attribution (integrated gradients), exact patching, circuit ablation and faithfulness, predictions.

Each module holds its server bodies (`@server_body`, see execution/remote.py) beside the driver that sends them.
"""
