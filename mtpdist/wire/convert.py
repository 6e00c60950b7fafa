"""Dataclasses <-> protobuf messages. The one place that knows the generated classes."""

from __future__ import annotations

from .types import (Activation, ForwardCall, ForwardResult, LoadResult, SequenceRows, ShardSpec, TensorInfo,
                    WorkerInfo)
from .v1 import worker_pb2 as pb


def activation_to_pb(a: Activation) -> pb.Tensor:
    return pb.Tensor(data=a.data if isinstance(a.data, bytes) else bytes(a.data), dtype=a.dtype, shape=list(a.shape))


def activation_from_pb(t: pb.Tensor) -> Activation:
    return Activation(data=t.data, dtype=t.dtype, shape=tuple(t.shape))


def spec_to_pb(s: ShardSpec) -> pb.ShardSpec:
    return pb.ShardSpec(model_hash=s.model_hash, layer_start=s.layer_start, layer_end=s.layer_end,
                        config_json=s.config_json,
                        tensors=[pb.TensorInfo(name=t.name, dtype=t.dtype, shape=list(t.shape), nbytes=t.nbytes,
                                               sha256=t.sha256) for t in s.tensors],
                        downstream=list(s.downstream), max_forward_tokens=s.max_forward_tokens,
                        budget_bytes=s.budget_bytes, upstream=s.upstream, route=s.route)


def spec_from_pb(s: pb.ShardSpec) -> ShardSpec:
    return ShardSpec(model_hash=s.model_hash, layer_start=s.layer_start, layer_end=s.layer_end,
                     config_json=s.config_json,
                     tensors=tuple(TensorInfo(t.name, t.dtype, tuple(t.shape), t.nbytes, t.sha256) for t in s.tensors),
                     downstream=tuple(s.downstream), max_forward_tokens=s.max_forward_tokens,
                     budget_bytes=s.budget_bytes, upstream=s.upstream, route=s.route)


def info_to_pb(i: WorkerInfo) -> pb.DescribeReply:
    return pb.DescribeReply(**i.__dict__)


def info_from_pb(r: pb.DescribeReply) -> WorkerInfo:
    return WorkerInfo(**{f: getattr(r, f) for f in WorkerInfo.__dataclass_fields__})


def forward_to_pb(c: ForwardCall) -> pb.ForwardRequest:
    return pb.ForwardRequest(
        sequences=[pb.SequenceRows(sequence_id=s.sequence_id, epoch=s.epoch, position=s.position, floor=s.floor,
                                   tokens=s.tokens, snapshots=list(s.snapshots), keep_as=s.keep_as) for s in c.sequences],
        hidden=activation_to_pb(c.hidden), next=[pb.Hop(address=a) for a in c.next])


def forward_from_pb(r: pb.ForwardRequest) -> ForwardCall:
    return ForwardCall(
        sequences=tuple(SequenceRows(s.sequence_id, s.position, s.tokens, s.epoch, tuple(s.snapshots), s.keep_as, s.floor)
                        for s in r.sequences),
        hidden=activation_from_pb(r.hidden), next=tuple(h.address for h in r.next))


def result_to_pb(r: ForwardResult) -> pb.ForwardReply:
    return pb.ForwardReply(hidden=activation_to_pb(r.hidden), positions=list(r.positions),
                           compute_us=list(r.compute_us), batch_rows=list(r.batch_rows))


def result_from_pb(r: pb.ForwardReply) -> ForwardResult:
    return ForwardResult(hidden=activation_from_pb(r.hidden), positions=tuple(r.positions),
                         compute_us=tuple(r.compute_us), batch_rows=tuple(r.batch_rows))


def load_result_to_pb(r: LoadResult) -> pb.LoadShardReply:
    return pb.LoadShardReply(source=r.source, bytes_received=r.bytes_received,
                             layer_start=r.layer_start, layer_end=r.layer_end, shard_digest=r.shard_digest)


def load_result_from_pb(r: pb.LoadShardReply) -> LoadResult:
    return LoadResult(r.source, r.bytes_received, r.layer_start, r.layer_end, r.shard_digest)
