# docs/models.md: `root` is the folder holding MNIST/raw/; here a tiny synthetic set in that layout.
import tempfile

from mpnode.models.mnist_data import write_idx_mnist

root = tempfile.mkdtemp()
write_idx_mnist(root, n_train=256, n_test=64)
