"""The matching loop written out (DESIGN §1.3), for the tests that check `match_logits` and DMM requests against it."""
from __future__ import annotations

import torch


def reference_match(model, x, targets, config, per_step=False):
    """DESIGN §1.3's fine-tune and its stopping rule written out: Adam on the MSE over all k logits, minibatches
    in the order `torch.randperm` draws from config.seed, lr = config.lr × decay^epoch set by hand (× decay^step
    if per_step, the bug the test must catch); each epoch's loss the size-weighted mean of its minibatch losses;
    converged once at least min_steps steps are taken and the best epoch loss of the last `patience` epochs is
    not below the best before them by more than tol × the starting (full, eval-mode) loss; then anneal_steps
    more steps at lr × (A − j)/A, j = 0..A−1, and a stop (or at max_steps).
    Returns the model, the full loss at start and end, the epoch losses until convergence and the steps."""
    def full_loss():
        with torch.no_grad():
            return ((model.eval()(x) - targets) ** 2).mean().item()

    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    order = torch.Generator().manual_seed(config.seed)
    start, step, epoch, anneal_at = full_loss(), 0, 0, None
    losses = [start]
    while step < config.max_steps:
        model.train()
        batch_losses = []
        for idx in torch.randperm(len(x), generator=order).split(config.batch_size):
            lr = config.lr * config.lr_decay ** (step if per_step else epoch)
            if anneal_at is not None:
                lr = anneal_at[1] * (config.anneal_steps - (step - anneal_at[0])) / config.anneal_steps
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            loss = ((model(x[idx]) - targets[idx]) ** 2).mean()
            loss.backward()
            opt.step()
            batch_losses.append((loss.item(), len(idx)))
            step += 1
            if step == config.max_steps or (anneal_at is not None and step - anneal_at[0] == config.anneal_steps):
                break
        if anneal_at is not None:
            if step - anneal_at[0] == config.anneal_steps:
                break
            continue
        epoch += 1
        losses.append(sum(v * n for v, n in batch_losses) / sum(n for _, n in batch_losses))
        window = config.patience
        if step >= config.min_steps and len(losses) > window and \
                min(losses[:-window]) - min(losses[-window:]) <= config.tol * start:
            if config.anneal_steps == 0:
                break
            anneal_at = (step, config.lr * config.lr_decay ** epoch)  # the next epoch's lr
    return model.eval(), (start, full_loss()), losses, step
