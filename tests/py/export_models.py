"""Models exported from Python for wick's InferenceSession tests
(tests/inference_export_test.cpp), written at test time with the venv's torch:

    python export_models.py OUT_DIR

writes into OUT_DIR (a fresh directory the caller then renames into place):

  net_script.pt       torch.jit.script of Net (eval mode)
  net_trace.pt        torch.jit.trace of Net on a [3, 1, 28, 28] example
  net.pt2             torch.export (dynamic batch 1..1024) + aoti_compile_and_package, CPU
  net_cuda.pt2        the same for CUDA, only where torch sees a GPU
  exported_program.pt2  torch.export.save of the ExportedProgram: a .pt2 without AOTInductor code
  tuple_script.pt     a scripted module whose forward returns (Tensor, Tensor)
  two_inputs_script.pt  a scripted module whose forward takes two tensors
  tuple.pt2           an AOTInductor package whose model returns two tensors
  state_dict.pt       torch.save of Net's state_dict: a zip, but not a model
  reference.json      inputs x [5, 1, 28, 28] and Net's eager outputs for them

Net takes [N, 1, 28, 28] float images and returns [N, 10] logits, as the
models wick-fmnist --serve-model serves do; it is small so that AOTInductor's
C++ compile stays short. BatchNorm and Dropout make eval mode matter.
"""

import json
import os
import sys

import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


class TupleNet(torch.nn.Module):
    def forward(self, x):
        return x, x * 2


class TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return x + y


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # running statistics away from (0, 1), so eval mode shows
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    example = torch.randn(3, 1, 28, 28)

    torch.jit.script(net).save(os.path.join(out, "net_script.pt"))
    torch.jit.trace(net, (example,)).save(os.path.join(out, "net_trace.pt"))
    torch.jit.script(TupleNet()).save(os.path.join(out, "tuple_script.pt"))
    torch.jit.script(TwoInputs()).save(os.path.join(out, "two_inputs_script.pt"))
    torch.save(net.state_dict(), os.path.join(out, "state_dict.pt"))

    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        ep = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}})
        torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(out, "net.pt2"))
        torch.export.save(ep, os.path.join(out, "exported_program.pt2"))
        ep_tuple = torch.export.export(TupleNet(), (example,), dynamic_shapes={"x": {0: batch}})
        torch._inductor.aoti_compile_and_package(
            ep_tuple, package_path=os.path.join(out, "tuple.pt2")
        )
        if torch.cuda.is_available():
            net_cuda = Net().cuda().eval()
            net_cuda.load_state_dict(net.state_dict())
            ep_cuda = torch.export.export(
                net_cuda, (example.cuda(),), dynamic_shapes={"x": {0: batch}}
            )
            torch._inductor.aoti_compile_and_package(
                ep_cuda, package_path=os.path.join(out, "net_cuda.pt2")
            )

    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        y = net(x)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(
            {
                "x": x.double().flatten().tolist(),
                "x_shape": list(x.shape),
                "y": y.double().flatten().tolist(),
                "y_shape": list(y.shape),
                "torch": torch.__version__,
            },
            f,
        )


if __name__ == "__main__":
    main()
