"""Compare a netdsl training step with the same model in PyTorch, weights copied by name."""
import numpy as np
import torch


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def norm_err(a, b) -> float:
    """Norm-wise relative error ||a - b|| / ||b||."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def copy_into_torch(params: dict, module: torch.nn.Module):
    """Load netdsl parameters into a torch module; names must match exactly."""
    state = module.state_dict()
    ours = set(params)
    theirs = {k for k in state if not k.endswith("num_batches_tracked")}
    assert ours == theirs, f"only netdsl: {sorted(ours - theirs)[:5]}, only torch: {sorted(theirs - ours)[:5]}"
    dtype = next(module.parameters()).dtype
    module.load_state_dict({k: torch.from_numpy(np.array(v)).to(dtype) for k, v in params.items()}, strict=False)


def torch_step(module, x, y, losses_fn):
    """Forward + backward in training mode; returns (loss, outputs, grads by name)."""
    module.train()
    module.zero_grad()
    xt = torch.from_numpy(x)
    out = module(xt)
    loss = losses_fn(out, torch.from_numpy(y))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in module.named_parameters()}
    return float(loss.detach()), out, grads
