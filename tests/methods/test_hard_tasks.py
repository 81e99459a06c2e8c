import torch

from fewshot.data.episodes import Episode
from fewshot.methods.hard_tasks import failure_class


def test_failure_class_is_the_class_with_the_lowest_query_accuracy():
    query_y = torch.tensor([0, 0, 1, 1, 2, 2])
    # class 0: 2/2 right, class 1: 0/2, class 2: 1/2
    predicted = torch.tensor([0, 0, 2, 0, 2, 1])
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    empty = torch.zeros(0)
    episode = Episode(empty, empty, empty, query_y, torch.tensor([40, 41, 42]))
    assert failure_class(logits, episode).item() == 41
