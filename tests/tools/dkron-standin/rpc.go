package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/emptypb"
)

// grpcService: Dkron's gRPC service is types.v1.Dkron since v4.0.9 (proto/types/v1/dkron.proto,
// "package types.v1") and was types.Dkron in v2.1.1-v4.0.8 (ARCHITECTURE.md); the env var
// DKRON_STANDIN_GRPC_PACKAGE=types serves the old name, so a client's path detection can be
// tested (a stand-in switch, not a Dkron setting).
func grpcService() string {
	if p := os.Getenv("DKRON_STANDIN_GRPC_PACKAGE"); p != "" {
		return p + ".Dkron"
	}
	return "types.v1.Dkron"
}

// The messages of Dkron v4.1.2 proto/types/v1/dkron.proto the stand-in serves, built at run
// time (no protoc): RaftServer{id=1, node=2, address=3, leader=4, voter=5, raft_protocol=6},
// RaftGetConfigurationResponse{repeated RaftServer servers=1; uint64 index=2},
// RaftRemovePeerByIDRequest{id=1}. SetJobRequest is the stand-in's own: field 1 holds the job
// as JSON (Dkron's holds a types.v1.Job message); only stand-ins send it.
var msgRaftServer, msgConfig, msgRemovePeer, msgSetJob protoreflect.MessageDescriptor

func init() {
	t := descriptorpb.FieldDescriptorProto_TYPE_STRING
	field := func(name string, num int32, typ descriptorpb.FieldDescriptorProto_Type, repeated bool, msg string) *descriptorpb.FieldDescriptorProto {
		label := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL
		if repeated {
			label = descriptorpb.FieldDescriptorProto_LABEL_REPEATED
		}
		f := &descriptorpb.FieldDescriptorProto{Name: proto.String(name), Number: proto.Int32(num), Type: typ.Enum(), Label: label.Enum(), JsonName: proto.String(name)}
		if msg != "" {
			f.TypeName = proto.String(msg)
		}
		return f
	}
	b := descriptorpb.FieldDescriptorProto_TYPE_BOOL
	msg := func(name string, fields ...*descriptorpb.FieldDescriptorProto) *descriptorpb.DescriptorProto {
		return &descriptorpb.DescriptorProto{Name: proto.String(name), Field: fields}
	}
	fd, err := protodesc.NewFile(&descriptorpb.FileDescriptorProto{
		Name: proto.String("standin/dkron.proto"), Package: proto.String("types.v1"), Syntax: proto.String("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{
			msg("RaftServer", field("id", 1, t, false, ""), field("node", 2, t, false, ""), field("address", 3, t, false, ""),
				field("leader", 4, b, false, ""), field("voter", 5, b, false, ""), field("raft_protocol", 6, t, false, "")),
			msg("RaftGetConfigurationResponse", field("servers", 1, descriptorpb.FieldDescriptorProto_TYPE_MESSAGE, true, ".types.v1.RaftServer"),
				field("index", 2, descriptorpb.FieldDescriptorProto_TYPE_UINT64, false, "")),
			msg("RaftRemovePeerByIDRequest", field("id", 1, t, false, "")),
			msg("SetJobRequest", field("job_json", 1, descriptorpb.FieldDescriptorProto_TYPE_BYTES, false, "")),
		}}, nil)
	if err != nil {
		panic(err)
	}
	ms := fd.Messages()
	msgRaftServer, msgConfig, msgRemovePeer, msgSetJob = ms.Get(0), ms.Get(1), ms.Get(2), ms.Get(3)
}

func newMsg(d protoreflect.MessageDescriptor) *dynamicpb.Message { return dynamicpb.NewMessage(d) }

func setField(m *dynamicpb.Message, name string, v any) {
	m.Set(m.Descriptor().Fields().ByName(protoreflect.Name(name)), protoreflect.ValueOf(v))
}

func getField(m *dynamicpb.Message, name string) protoreflect.Value {
	return m.Get(m.Descriptor().Fields().ByName(protoreflect.Name(name)))
}

// raftServerInfo is one RaftServer entry.
type raftServerInfo struct {
	ID, Node, Address, RaftProtocol string
	Leader, Voter                   bool
}

type unaryFn func(ctx context.Context, req proto.Message) (proto.Message, error)

// newGRPCServer: Dkron v4.1.2 dkron/grpc.go Serve registers the Dkron service (and the agent
// service) on the gRPC side of the mux. Errors are plain Go errors, so clients see code
// Unknown with the error text, as Dkron's handlers return them.
func newGRPCServer(a *Agent, server bool) *grpc.Server {
	s := grpc.NewServer()
	if !server {
		return s
	}
	methods := map[string]struct {
		req func() proto.Message
		fn  unaryFn
	}{
		"RaftGetConfiguration": {func() proto.Message { return &emptypb.Empty{} }, a.grpcGetConfiguration},
		"RaftRemovePeerByID":   {func() proto.Message { return newMsg(msgRemovePeer) }, a.grpcRemovePeer},
		"SetJob":               {func() proto.Message { return newMsg(msgSetJob) }, a.grpcSetJob},
		"Leave": {func() proto.Message { return &emptypb.Empty{} }, func(context.Context, proto.Message) (proto.Message, error) {
			return &emptypb.Empty{}, a.Stop()
		}},
		// No executions ever run here: an empty GetActiveExecutionsResponse.
		"GetActiveExecutions": {func() proto.Message { return &emptypb.Empty{} }, func(context.Context, proto.Message) (proto.Message, error) {
			return &emptypb.Empty{}, nil
		}},
	}
	desc := grpc.ServiceDesc{ServiceName: grpcService(), HandlerType: (*any)(nil), Metadata: "standin/dkron.proto"}
	for name, m := range methods {
		desc.Methods = append(desc.Methods, grpc.MethodDesc{MethodName: name,
			Handler: func(_ any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
				req := m.req()
				if err := dec(req); err != nil {
					return nil, err
				}
				return m.fn(ctx, req)
			}})
	}
	s.RegisterService(&desc, a)
	return s
}

// grpcGetConfiguration: Dkron v4.1.2 dkron/grpc.go RaftGetConfiguration, answered by any
// server (a follower too) from its own raft: each server's id and address, node = the serf
// member whose IP + port tag is that address ("(unknown)" otherwise), raft_protocol from a
// raft_vsn tag ("unknown": Dkron never sets one), leader when the address is raft's leader.
func (a *Agent) grpcGetConfiguration(context.Context, proto.Message) (proto.Message, error) {
	r := a.getRaft()
	if r == nil {
		return nil, raft.ErrRaftShutdown
	}
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	names := map[raft.ServerAddress]string{}
	for _, m := range a.serf.Members() {
		if ok, p := isServer(m); ok {
			names[raft.ServerAddress((&net.TCPAddr{IP: m.Addr, Port: p.Port}).String())] = m.Name
		}
	}
	leader := r.Leader()
	resp := newMsg(msgConfig)
	list := resp.Mutable(msgConfig.Fields().ByName("servers")).List()
	for _, s := range f.Configuration().Servers {
		node, ok := names[s.Address]
		if !ok {
			node = "(unknown)"
		}
		e := newMsg(msgRaftServer)
		setField(e, "id", string(s.ID))
		setField(e, "node", node)
		setField(e, "address", string(s.Address))
		setField(e, "leader", s.Address == leader)
		setField(e, "voter", s.Suffrage == raft.Voter)
		setField(e, "raft_protocol", "unknown")
		list.Append(protoreflect.ValueOfMessage(e))
	}
	setField(resp, "index", f.Index())
	return resp, nil
}

// grpcRemovePeer: Dkron v4.1.2 dkron/grpc.go RaftRemovePeerByID: an id not in the
// configuration is an error; else raft.RemoveServer, which on a follower fails with raft's
// "node is not the leader" (ARCHITECTURE.md: remove-peer works only on the leader).
func (a *Agent) grpcRemovePeer(_ context.Context, req proto.Message) (proto.Message, error) {
	id := getField(req.(*dynamicpb.Message), "id").String()
	r := a.getRaft()
	if r == nil {
		return nil, raft.ErrRaftShutdown
	}
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	found := false
	for _, s := range f.Configuration().Servers {
		found = found || s.ID == raft.ServerID(id)
	}
	if !found {
		return nil, fmt.Errorf("id %q was not found in the Raft configuration", id)
	}
	if err := r.RemoveServer(raft.ServerID(id), 0, 0).Error(); err != nil {
		logf(lWarn, "failed to remove Raft peer %s: %v", id, err)
		return nil, err
	}
	logf(lWarn, "removed Raft peer %s", id)
	return &emptypb.Empty{}, nil
}

// grpcSetJob: Dkron v4.1.2 dkron/grpc.go SetJob -> agent.go applySetJob: the job goes into the
// raft log (type byte 0 = SetJobType, fsm.go) with a 30 s timeout; on a follower raft refuses.
func (a *Agent) grpcSetJob(_ context.Context, req proto.Message) (proto.Message, error) {
	body := getField(req.(*dynamicpb.Message), "job_json").Bytes()
	r := a.getRaft()
	if r == nil {
		return nil, fmt.Errorf("raft not initialized")
	}
	f := r.Apply(append([]byte{setJobType}, body...), 30*time.Second)
	if err := f.Error(); err != nil {
		return nil, err
	}
	if err, ok := f.Response().(error); ok && err == errParentJobNotFound {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// dial: Dkron v4.1.2 dkron/grpc_client.go Connect: insecure, blocking, 10 s timeout.
func dial(addr string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Deprecated in grpc-go, still there, and what Dkron calls.
	return grpc.DialContext(ctx, addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithBlock())
}

func invoke(addr, method string, req, resp proto.Message) error {
	conn, err := dial(addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Invoke(context.Background(), "/"+grpcService()+"/"+method, req, resp)
}

func rpcGetConfiguration(addr string) ([]raftServerInfo, uint64, error) {
	resp := newMsg(msgConfig)
	if err := invoke(addr, "RaftGetConfiguration", &emptypb.Empty{}, resp); err != nil {
		return nil, 0, err
	}
	var out []raftServerInfo
	list := getField(resp, "servers").List()
	for i := 0; i < list.Len(); i++ {
		e := list.Get(i).Message().Interface().(*dynamicpb.Message)
		out = append(out, raftServerInfo{ID: getField(e, "id").String(), Node: getField(e, "node").String(),
			Address: getField(e, "address").String(), RaftProtocol: getField(e, "raft_protocol").String(),
			Leader: getField(e, "leader").Bool(), Voter: getField(e, "voter").Bool()})
	}
	return out, getField(resp, "index").Uint(), nil
}

func rpcRemovePeer(addr, id string) error {
	req := newMsg(msgRemovePeer)
	setField(req, "id", id)
	return invoke(addr, "RaftRemovePeerByID", req, &emptypb.Empty{})
}

func rpcActiveExecutions(addr string) error {
	return invoke(addr, "GetActiveExecutions", &emptypb.Empty{}, &emptypb.Empty{})
}

// rpcSetJob: Dkron v4.1.2 dkron/grpc_client.go SetJob: every server, the leader included,
// sends the job to raft's current leader address over gRPC (with no leader grpc-go v1.82.1
// refuses the empty target at once: "... received empty target in Build()").
func (a *Agent) rpcSetJob(j *Job) error {
	body, err := json.Marshal(j)
	if err != nil {
		return err
	}
	req := newMsg(msgSetJob)
	setField(req, "job_json", body)
	var leader raft.ServerAddress
	if r := a.getRaft(); r != nil {
		leader = r.Leader()
	}
	return invoke(string(leader), "SetJob", req, &emptypb.Empty{})
}
