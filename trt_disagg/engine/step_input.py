"""What one forward pass needs, built by the scheduler on the driver and sent to every rank.

A batch holds sequences that each bring `query_len` new tokens (a whole prompt in prefill, one token in
decode) on top of `context_len - query_len` tokens already in the KV cache. Linear layers see the new
tokens flattened ([T, hidden]); attention pads them per sequence (see layers.paged_attention).
It is plain lists so it pickles small; ranks turn it into tensors once per step (`StepTensors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepInput:
    token_ids: list[int]  # new tokens of all sequences, concatenated
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens per sequence after this step (cached + new)
    block_tables: list[list[int]]  # per sequence

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StepTensors:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    new_slots: torch.Tensor  # [T] cache slot of each new token
    context_slots: torch.Tensor  # [B, Cmax] cache slot of every context position (0 where padded)
    key_mask: torch.Tensor  # [B, 1, Qmax, Cmax] True where a query may attend a key
    query_index: torch.Tensor  # [B, Qmax] index into the flat tokens (0 where padded)
    query_valid: torch.Tensor  # [B, Qmax] bool
    query_rows: torch.Tensor  # [T] row of each flat token in the flattened [B * Qmax] padded queries
    last_token_index: torch.Tensor  # [B] flat index of each sequence's last new token


def build_step_tensors(step: StepInput, tokens_per_block: int, device: torch.device | None = None) -> StepTensors:
    """The step's index tensors, built on `device`: only the plain lists cross to it (a few KiB), not the
    [B, Qmax, Cmax] attention mask, which is tens of MiB for a long prefill batch."""
    dev = device or torch.device("cpu")
    q = torch.tensor(step.query_lens, dtype=torch.long, device=dev)
    c = torch.tensor(step.context_lens, dtype=torch.long, device=dev)
    num_seqs, q_max, c_max = step.num_seqs, max(step.query_lens), max(step.context_lens)
    blocks_max = max(len(bt) for bt in step.block_tables)
    table = torch.tensor([bt + [0] * (blocks_max - len(bt)) for bt in step.block_tables], dtype=torch.long,
                         device=dev)

    key_pos = torch.arange(c_max, device=dev)
    context_slots = table[:, key_pos // tokens_per_block] * tokens_per_block + key_pos % tokens_per_block
    key_valid = key_pos[None, :] < c[:, None]
    context_slots = torch.where(key_valid, context_slots, torch.zeros_like(context_slots))

    q_pos = torch.arange(q_max, device=dev)
    query_valid = q_pos[None, :] < q[:, None]
    starts = torch.cumsum(q, 0) - q
    query_index = torch.where(query_valid, starts[:, None] + q_pos[None, :], torch.zeros_like(query_valid, dtype=torch.long))
    abs_query_pos = (c - q)[:, None] + q_pos[None, :]  # [B, Qmax] absolute position of each query row
    key_mask = (key_pos[None, None, :] <= abs_query_pos[:, :, None]) & key_valid[:, None, :]

    # Per flat token by arithmetic, not by boolean indexing (which waits for the GPU to count the mask).
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=dev), q, output_size=step.num_tokens)
    offset_in_seq = torch.arange(step.num_tokens, device=dev) - starts[seq_of_token]
    positions = (c - q)[seq_of_token] + offset_in_seq
    new_slots = context_slots[seq_of_token, positions]
    return StepTensors(
        token_ids=torch.tensor(step.token_ids, dtype=torch.long, device=dev),
        positions=positions,
        new_slots=new_slots,
        context_slots=context_slots,
        key_mask=key_mask[:, None, :, :],
        query_index=query_index,
        query_valid=query_valid,
        query_rows=seq_of_token * q_max + offset_in_seq,
        last_token_index=starts + q - 1,
    )
